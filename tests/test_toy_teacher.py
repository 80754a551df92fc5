"""The toy world proves its own exactness: Tweedie, consistency across scales, spectra, metrics."""
import math

import pytest
import torch
import torch.nn.functional as F

from toy_teacher import ToyTeacher, octave_bands

SCALES = (8, 16, 24, 32)


@pytest.fixture(scope="module")
def t():
    return ToyTeacher()


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("r", SCALES)
@pytest.mark.parametrize("s", [0.05, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("conditional", [False, True])
def test_tweedie_matches_autograd_of_log_prob(t, r, s, conditional):
    # grad log p_s(x) = ((1-s) E[x0|x] - x) / s^2, with the gradient taken by autograd of our own log-density
    x0, y = t.sample(4, r, generator=gen(r))
    x = ((1 - s) * x0.double() + s * torch.randn(x0.shape, generator=gen(1), dtype=torch.float64))
    x.requires_grad_(True)
    y = y if conditional else None
    (grad,) = torch.autograd.grad(t.log_prob(x, s, y).sum(), x)
    tweedie = ((1 - s) * t.denoise(x.detach(), s, y) - x.detach()) / s ** 2
    torch.testing.assert_close(grad, tweedie, rtol=1e-9, atol=1e-9 * tweedie.abs().max().item())


def pooled_covariance(t, r):
    """Dense (r*r, r*r) covariance of the area-downsampled full-resolution field, built without the
    world's own eigenbasis: the circulant Sigma from P by FFT, pooled by F.interpolate."""
    R = t.res
    basis = torch.eye(R * R, dtype=torch.float64).reshape(-1, 1, R, R)
    cov = torch.fft.ifft2(t.P * torch.fft.fft2(basis[:, 0], norm="ortho"), norm="ortho").real
    A = F.interpolate(basis, size=r, mode="area").reshape(R * R, r * r).T  # (r*r, R*R)
    return A @ cov.reshape(R * R, R * R) @ A.T


@pytest.mark.parametrize("r", [8, 24])
def test_log_prob_is_the_dense_gaussian_of_the_pooled_field_when_k_is_one(r):
    # one component: the log-density must equal an independent dense Gaussian whose covariance is
    # the area-pooled full-resolution field, also at 24 px, where that covariance is not circulant
    t = ToyTeacher(num_classes=1, per_class=1, channels=1)
    s = 0.4
    cov = (1 - s) ** 2 * pooled_covariance(t, r) + s ** 2 * torch.eye(r * r, dtype=torch.float64)
    mean = (1 - s) * F.interpolate(t.mu, size=r, mode="area").reshape(-1)
    x = torch.randn(3, 1, r, r, generator=gen(0), dtype=torch.float64)
    dense = torch.distributions.MultivariateNormal(mean, cov).log_prob(x.reshape(3, -1))
    torch.testing.assert_close(t.log_prob(x, s), dense, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("r", SCALES)
def test_denoise_at_zero_noise_returns_input(t, r):
    x, _ = t.sample(3, r, generator=gen(0))
    x = x.double() + 0.1 * torch.randn(x.shape, generator=gen(1), dtype=torch.float64)  # even off-manifold
    torch.testing.assert_close(t.denoise(x, 0.0), x, rtol=0, atol=1e-12)
    assert (t.denoise(x, 1e-4) - x).abs().max() < 1e-3


def test_denoise_at_full_noise_returns_the_prior_mean(t):
    x = torch.randn(2, 3, 32, 32, generator=gen(0), dtype=torch.float64)
    mean = t.mu.mean(0, keepdim=True).expand_as(x)
    torch.testing.assert_close(t.denoise(x, 1.0), mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("r", [8, 16, 24])
def test_every_scale_is_the_area_downsampled_world(t, r):
    # covariance and means of the world at r equal those of area-pooled full-resolution samples
    world = t.scale(r)  # FFT at 8 and 16 px (circulant), a dense eigenbasis at 24
    basis = torch.eye(r * r, dtype=torch.float64).reshape(-1, 1, r, r)
    own = world.image(world.lam * world.coefficients(basis)).reshape(r * r, r * r)  # Sigma_r e_j
    pooled = pooled_covariance(t, r)
    assert ((own - pooled).norm() / pooled.norm()).item() < 1e-10
    torch.testing.assert_close(world.mu, F.interpolate(t.mu, size=r, mode="area"))
    # the exact spectrum the blur meter compares against is the diagonal of the DFT of Sigma_r
    Fr = torch.fft.fft2(torch.eye(r * r, dtype=torch.float64).reshape(-1, r, r), norm="ortho")
    Fm = Fr.reshape(r * r, r * r)
    diag = (Fm @ pooled.to(Fm.dtype) @ Fm.conj().T).diagonal().real.reshape(r, r)
    torch.testing.assert_close(world.power, diag, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("s", [0.05, 0.1])
def test_the_denoiser_is_bayes_optimal_on_area_downsampled_samples_at_24px(s):
    # one component, so E[x0|x_t] is linear and its mean-squared error has a closed form:
    # MMSE = mean_j lam_j s^2 / ((1-s)^2 lam_j + s^2). Measured on 32 px samples pooled to 24 px.
    t = ToyTeacher(num_classes=1, per_class=1, channels=1)
    x = F.interpolate(t.sample(2000, generator=gen(0))[0], size=24, mode="area").double()
    x_t = (1 - s) * x + s * torch.randn(x.shape, generator=gen(1), dtype=torch.float64)
    world = t.scale(24)
    mmse = (world.lam * s ** 2 / ((1 - s) ** 2 * world.lam + s ** 2)).mean().item()
    assert abs(F.mse_loss(t.denoise(x_t, s), x).item() / mmse - 1) < 0.01
    # a denoiser that takes the 24 px field as circulant (Wiener per DFT frequency) is 7-11% worse
    mu, a = world.mu[0], 1 - s
    gain = a * world.power / (a ** 2 * world.power + s ** 2)
    circulant = mu + torch.fft.ifft2(gain * torch.fft.fft2(x_t - a * mu, norm="ortho"), norm="ortho").real
    assert F.mse_loss(circulant, x).item() / mmse > 1.05


def test_blur_meter_reads_zero_on_exact_samples_negative_on_blur_positive_on_texture(t):
    n = 500
    x, y = t.sample(n, generator=gen(2))
    exact = t.blur_meter(x)
    assert max(abs(v) for v in exact) < 0.15, exact
    # the posterior mean at s = 0.25 keeps the low frequencies and loses the fine ones
    x_t = 0.75 * x + 0.25 * torch.randn(x.shape, generator=gen(3))
    blur = t.blur_meter(t.denoise(x_t, 0.25, y))
    assert blur[-1] < -3 and blur[-1] < blur[0] and all(v < 0 for v in blur), blur
    # the texture (x - its prototype) amplified by 1.3: +20 log10(1.3) = +2.28 dB in every band
    proto = t.mu[t.assign(x)].float()
    loud = t.blur_meter(proto + 1.3 * (x - proto))
    assert all(abs(v - 2.28) < 0.2 for v in loud), loud
    # at every scale, on the world's own samples and on pooled full-resolution ones alike (4 px:
    # a single band, [1, inf) cycles per image)
    for r in (4, 8, 16, 24):
        for z in (t.sample(n, r, generator=gen(r))[0], F.interpolate(x, size=r, mode="area")):
            meter = t.blur_meter(z)
            assert len(meter) == len(octave_bands(r)) and max(abs(v) for v in meter) < 0.15


def test_prototype_error_sums_its_bands_and_finds_a_planted_pattern_in_its_band(t):
    """Parseval: the parts (DC, then each octave) sum to the total, which is fd_parts's. A cosine of
    6 cycles per image planted in one component's samples adds its squared norm over the number of
    hit components to the band [4, 8) alone; every other part stays as it was, to rounding."""
    n = 800
    x, _ = t.sample(n, y=torch.arange(n) % 4, generator=gen(30))
    k = t.assign(x)
    base = t.prototype_error(x, k=k)
    assert len(base["bands"]) == 1 + len(octave_bands(32))
    assert abs(sum(base["bands"]) - base["total"]) < 1e-9 * base["total"]
    assert abs(base["total"] - t.fd_parts(x)["prototype_error"]) < 1e-9 * base["total"]
    i = torch.arange(32, dtype=torch.float64)
    pattern = torch.zeros(3, 32, 32, dtype=torch.float64)
    pattern[0] = 0.1 * torch.cos(2 * math.pi * 6 * i / 32)[None, :]  # red channel, 6 cycles across
    planted = t.prototype_error(x.double() + (k == 0)[:, None, None, None] * pattern, k=k)
    hit = len(k.unique())
    band = 1 + [lo <= 6 < hi for lo, hi in octave_bands(32)].index(True)
    added = [p - b for p, b in zip(planted["bands"], base["bands"])]
    assert abs(added[band] - (pattern ** 2).sum() / hit) < 0.05 * (pattern ** 2).sum() / hit, added
    assert all(abs(a) < 1e-9 for j, a in enumerate(added) if j != band), added


def test_texture_alignment_splits_the_random_texture_from_the_systematic_error(t):
    """The exact DMD move mu_real - mu_G (both Bayes denoisers, at s = 0.1) on G's samples raises
    the random texture in every band (cosine > 0) where G's field has too little power (x0.5) and
    lowers it where too much (x2). Exact identities: the random part itself reads 1 as random and
    0 as systematic (it sums to 0 over each component's samples); a move constant over each
    component's samples reads 0 as random, and minus the mean texture reads -1 as systematic.
    Noise independent of x reads about 0."""
    n, s = 400, 0.1
    y = torch.arange(n) % 4
    for gain, sign in ((0.5, 1), (2.0, -1)):
        world_g = t.with_spectrum(t.P * gain)
        x, _ = world_g.sample(n, y=y, generator=gen(40))
        x_s = (1 - s) * x.double() + s * torch.randn(x.shape, generator=gen(41), dtype=torch.float64)
        cos = t.texture_alignment(x, t.denoise(x_s, s, y) - world_g.denoise(x_s, s, y))
        assert len(cos["random"]) == len(octave_bands(32)), cos
        assert min(sign * v for v in cos["random"]) > 0.05, (gain, cos)
    k = t.assign(x)
    mean_tex = t._mean_texture(x, k)[0][k]
    rand_part = x.double() - t.mu[k] - mean_tex
    own = t.texture_alignment(x, rand_part, k=k)
    assert all(abs(v - 1) < 1e-9 for v in own["random"]) and all(abs(v) < 1e-9 for v in own["systematic"])
    assert all(abs(v - 0.1) < 1e-9 for v in t.texture_alignment(x, 0.1 * rand_part, k=k, rate=True)["random"])
    back = t.texture_alignment(x, -mean_tex, k=k)
    assert all(abs(v) < 1e-9 for v in back["random"]) and all(abs(v + 1) < 1e-9 for v in back["systematic"])
    noise = t.texture_alignment(x, torch.randn(x.shape, generator=gen(42)), k=k)
    assert max(abs(v) for v in noise["random"]) < 0.05


def test_fd_parts_each_read_their_own_defect_and_the_floor_on_exact_samples(t):
    n = 500
    x, _ = t.sample(n, y=torch.arange(n) % 4, generator=gen(20))
    floor = t.noise_floor(n, seed=21)["fd"]
    exact = dict(t.fd_parts(x), fd=t.frechet(x))
    for name in ("fd", "prototypes", "modes", "texture"):
        assert abs(exact[name] - floor) < 0.15 * floor, (name, exact, floor)
    k = t.assign(x)
    proto = t.mu[k].float()
    # a colour offset on one component's samples: a prototype error, and nothing else
    shifted = x + 0.2 * (k == 0).float()[:, None, None, None]
    off = dict(t.fd_parts(shifted), fd=t.frechet(shifted))
    assert off["fd"] > exact["fd"] + 2 and off["prototype_error"] > 5 * exact["prototype_error"]
    for name in ("prototypes", "modes", "texture"):
        assert abs(off[name] - exact[name]) < 1e-6 * exact[name], name
    # too much texture: the texture part rises, the mode part does not
    loud = t.fd_parts(proto + 1.3 * (x - proto))
    assert loud["texture"] > 1.2 * floor and abs(loud["modes"] - floor) < 0.15 * floor, loud
    # one component of each class's two: the mode part rises, the texture part does not
    first = torch.stack([torch.nonzero(t.comp_class == c)[0, 0] for c in range(4)])
    collapsed = t.fd_parts(t.mu[first[torch.arange(n) % 4]].float() + (x - proto))
    assert collapsed["modes"] > 3 * floor and abs(collapsed["texture"] - floor) < 0.15 * floor


def radial(power):
    """Radial average of a (..., n, n) 2-D spectrum over integer rings |k|; returns rings 1..n/2."""
    n = power.shape[-1]
    k = torch.fft.fftfreq(n) * n
    ring = (k[:, None] ** 2 + k[None, :] ** 2).sqrt().round().long()
    p = power.reshape(-1, n * n).mean(0)
    out = torch.zeros(ring.max() + 1, dtype=p.dtype).index_add_(0, ring.reshape(-1), p)
    return out[1: n // 2 + 1] / torch.bincount(ring.reshape(-1))[1: n // 2 + 1]


def test_sample_mean_and_spectrum_match_analytic(t):
    x, _ = t.sample(4000, generator=gen(3))
    x = x.double()
    mean = t.mu.mean(0)
    se = 0.5 / math.sqrt(len(x))  # per-pixel std is below 0.5
    assert (x.mean(0) - mean).abs().max() < 5 * se
    # analytic E|F x0|^2 per frequency: the field spectrum plus the prototypes' mean power
    analytic = t.P + (torch.fft.fft2(t.mu, norm="ortho").abs() ** 2).mean((0, 1))
    empirical = (torch.fft.fft2(x, norm="ortho").abs() ** 2).mean((0, 1))
    ra, re_ = radial(analytic), radial(empirical)
    assert ((re_ / ra).log().abs() < 0.1).all()
    f = torch.arange(1, 17, dtype=torch.float64).log()
    slope_a = torch.linalg.lstsq(torch.stack([f, torch.ones_like(f)], 1), ra.log()[:, None]).solution[0]
    slope_e = torch.linalg.lstsq(torch.stack([f, torch.ones_like(f)], 1), re_.log()[:, None]).solution[0]
    assert abs(slope_a - slope_e) < 0.05
    # the field is the natural-image-like f^-2 law (-1.8 over rings 1..16: the DC regulariser bends the
    # first ring); the sharp-edged prototypes fall as f^-3 and steepen the data's spectrum to about -2.6
    slope_field = torch.linalg.lstsq(torch.stack([f, torch.ones_like(f)], 1), radial(t.P).log()[:, None]).solution[0]
    assert -2.0 < slope_field < -1.6
    assert -3.0 < slope_a < -2.2


def test_exact_samples_score_at_the_noise_floor_and_collapse_does_not(t):
    n = 500
    floor = t.noise_floor(n, seed=10)
    m = t.evaluate(t.sample(n, generator=gen(11))[0])
    assert abs(m["fd"] - floor["fd"]) < 0.15 * floor["fd"]
    assert m["modes_hit"] == floor["modes_hit"] == 8
    assert m["mode_kl"] < 0.05
    # collapse to the prototypes: best possible NLL-like fit of each mode, but no field -> FD far above floor
    k = torch.arange(n) % 8
    collapsed = t.evaluate(t.mu[k].float())
    assert collapsed["fd"] > 1.3 * floor["fd"] and collapsed["modes_hit"] == 8


def test_frechet_matches_dense_computation():
    t = ToyTeacher(channels=1)
    x, _ = t.sample(300, 24, generator=gen(4))
    x = (x * 1.3 + 0.05).double()  # something off the true distribution
    mu = t.scale(24).mu
    pi = t.log_pi.exp()
    m = (pi[:, None] * mu.reshape(8, -1)).sum(0)
    d = mu.reshape(8, -1) - m
    S = pooled_covariance(t, 24) + (pi[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    X = x.reshape(300, -1)
    C1 = torch.cov(X.T)
    ev, U = torch.linalg.eigh(S)
    Sh = U @ torch.diag(ev.clamp(min=0).sqrt()) @ U.T
    cross = torch.linalg.eigvalsh(Sh @ C1 @ Sh).clamp(min=0).sqrt().sum()
    dense = ((X.mean(0) - m) ** 2).sum() + C1.trace() + S.trace() - 2 * cross
    assert abs(t.frechet(x) - dense.item()) < 1e-5 * dense.item()  # sqrt of tiny eigenvalues


def test_exact_euler_improves_monotonically_with_steps(t):
    n = 400
    fds = [t.evaluate(t.euler(n, k, generator=gen(5)))["fd"] for k in (1, 2, 4, 8, 32)]
    assert all(a > b for a, b in zip(fds, fds[1:])), fds
    floor = t.noise_floor(n, seed=6)["fd"]
    assert fds[0] > 10 * floor and fds[-1] < 1.3 * floor


def test_class_conditional_samples_and_denoiser_stay_in_class(t):
    y = torch.tensor([0, 1, 2, 3] * 8)
    x, labels = t.sample(32, y=y, generator=gen(7))
    assert torch.equal(labels, y)
    assert torch.equal(t.comp_class[t.assign(x)], y)
