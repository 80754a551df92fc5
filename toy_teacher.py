"""toy_teacher.py: a known image distribution with its exact denoiser, and the instruments that
measure samplers and networks against it.

The world is a Gaussian mixture in pixel space:

    x0 ~ sum_k pi_k N(mu_k, Sigma),
        mu_k: a prototype image (a coloured shape on a coloured background),
        Sigma: a stationary Gaussian field with power spectrum P(f) ~ f^-2, per channel.

Components carry class labels, several components per class. Under SwD's flow-matching convention,
x_t = (1-s) x0 + s eps, every quantity is exact: samples, the posterior mean E[x0|x_t] (so the
velocity and, by Tweedie, the score) and log p_s(x_t) with all constants.

Scales. The world at resolution r is the `area` down-sampling A_r of the full-resolution world, with
nothing approximated: means A_r mu_k and field covariance Sigma_r = A_r Sigma A_r^T. Sigma is
circulant at full resolution and stays so for integer factors (32 -> 16, 8): the unitary FFT
diagonalises it, Sigma_r = F^H diag(P_r) F. Not so for 32 -> 24, where the uneven 2-pixel windows
couple frequencies; there the scale keeps the dense eigenbasis of its covariance, Sigma_r = U
diag(lam) U^T (576 x 576). Either way every posterior quantity is computed per basis direction, and
training data area-downsampled from 32 px is exactly the world at every scale of any schedule.

Instruments (all take callables, so this file never imports swd_mini): `evaluate` (exact Frechet
distance, NLL, mode KL), `blur_meter` (per-band power of the texture against the exact field, in
dB), `fd_parts` (that distance split into prototypes, modes and texture), `prototype_error` (the
mean texture's error per band), `denoising_error`, `dmd_gradient_at_data`, `mode_entropy`,
`posterior_mean_chain` and `curve_row` (one learning-curve row). `python toy_teacher.py` prints the
exact reference tables.

    t = ToyTeacher(); x, y = t.sample(16, 32); x0_hat = t.denoise(x_t, s); t.evaluate(x)
"""
import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _shape_masks(R, supersample=4):
    """Anti-aliased masks (4, R, R) in [0, 1]: disk, square, triangle, ring, drawn at 4x and
    area-averaged."""
    n = R * supersample
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    rr = (xx ** 2 + yy ** 2).sqrt()
    disk = rr < 0.6
    square = (xx.abs() < 0.5) & (yy.abs() < 0.5)
    # apex up, base at y = 0.5 (image y points down)
    triangle = (yy < 0.5) & (yy > -0.6 + 2.2 * xx.abs())
    ring = (rr < 0.75) & (rr > 0.4)
    masks = torch.stack([disk, square, triangle, ring]).double()[:, None]
    return F.avg_pool2d(masks, supersample)[:, 0]


def octave_bands(r):
    """Frequency bands of an r x r image, cycles per image, finest last: [1, ...) ... [r/4, inf).
    Returns [(low, high)]; DC is in none of them."""
    edges = [r / 4]
    while edges[-1] / 2 > 1:
        edges.append(edges[-1] / 2)
    edges = [1.0] + [e for e in edges[::-1] if e > 1] + [math.inf]  # r = 4: one band, [1, inf)
    return list(zip(edges, edges[1:]))


def octave_masks(r):
    """One boolean mask (r, r) over the FFT grid of an r x r image per band of octave_bands(r)."""
    k = torch.fft.fftfreq(r, 1 / r, dtype=torch.float64)
    radius = (k[:, None] ** 2 + k[None, :] ** 2).sqrt()  # cycles per image
    return [(radius >= low) & (radius < high) for low, high in octave_bands(r)]


class Scale(NamedTuple):
    """The world at one resolution r (n = r * r pixels per channel)."""
    mu: torch.Tensor  # (K, C, r, r) prototypes, area-downsampled
    coef: torch.Tensor  # (K, C, n) prototypes in the basis (complex for the FFT)
    U: torch.Tensor  # (n, n) eigenvectors of the field covariance (columns); None: the unitary FFT
    lam: torch.Tensor  # (n,) the field's variance along each basis direction
    power: torch.Tensor  # (r, r) E |DFT(field)|^2 per frequency (unitary DFT): the exact spectrum

    def coefficients(self, x):
        """(B, C, r, r) images -> (B, C, n) coefficients in this scale's basis."""
        if self.U is None:
            return torch.fft.fft2(x, norm="ortho").flatten(2)
        return x.flatten(2) @ self.U

    def image(self, X):
        """The inverse of coefficients: (B, C, n) -> (B, C, r, r)."""
        r = self.mu.shape[-1]
        if self.U is None:
            return torch.fft.ifft2(X.unflatten(2, (r, r)), norm="ortho").real
        return (X @ self.U.T).unflatten(2, (r, r))


class ToyTeacher:
    """Exact Gaussian-mixture image world. Components: `num_classes` shapes x `per_class` colour
    schemes."""

    def __init__(self, res=32, num_classes=4, per_class=2, channels=3, field_std=0.15, slope=2.0,
                 seed=0):
        assert 1 <= num_classes <= 4, "the toy world has 4 shapes: disk, square, triangle, ring"
        self.res, self.channels, self.num_classes = res, channels, num_classes
        g = torch.Generator().manual_seed(seed)
        K = num_classes * per_class
        # colours in [-0.7, 0.7]
        fg = torch.rand(K, channels, generator=g, dtype=torch.float64) * 1.4 - 0.7
        bg = torch.rand(K, channels, generator=g, dtype=torch.float64) * 1.4 - 0.7
        fg = torch.where((fg - bg).abs() < 0.4, -bg.sign() * 0.6, fg)  # keep every shape visible
        self.comp_class = torch.arange(K) // per_class  # (K,) class label of each component
        m = _shape_masks(res)[self.comp_class][:, None]  # (K, 1, R, R)
        self.mu = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m  # (K, C, R, R)
        self.log_pi = torch.full((K,), -math.log(K), dtype=torch.float64)  # uniform mixture weights
        f = torch.fft.fftfreq(res, dtype=torch.float64)  # cycles per pixel
        f2 = f[:, None] ** 2 + f[None, :] ** 2
        P = (f2 + 1.0 / res ** 2) ** (-slope / 2)  # power law, finite at DC
        self.P = P * field_std ** 2 / P.mean()  # per-pixel variance = spectrum mean = field_std^2
        self._cache = {}

    def with_spectrum(self, P):
        """The same mixture with another full-resolution field spectrum P (R, R): for instance the
        exact distribution of a generator that gets the texture's amplitude wrong."""
        other = copy.copy(self)
        other.P, other._cache = P.double(), {}
        return other

    # ------------------------------------------------------------ the world at resolution r
    def scale(self, r):
        """The world at resolution r (a Scale), cached. See the module docstring."""
        if r not in self._cache:
            R = self.res
            mu = F.interpolate(self.mu, size=(r, r), mode="area")
            a = F.adaptive_avg_pool1d(torch.eye(R, dtype=torch.float64)[:, None], r)[:, 0].T
            if R % r == 0:  # circulant: P_r(k') = sum_k P(k) |(F_r A F_R^H)[k', k]|^2, per axis
                Fr, FR = (torch.fft.fft(torch.eye(n, dtype=torch.complex128), norm="ortho")
                          for n in (r, R))
                Q = (Fr @ a.to(torch.complex128) @ FR.conj().T).abs() ** 2  # (r, R)
                P_r = Q @ self.P @ Q.T
                world = Scale(mu, torch.fft.fft2(mu, norm="ortho").flatten(2), None,
                              P_r.flatten(), P_r)
            else:  # dense: A Sigma A^T and its eigenbasis
                A = torch.kron(a, a)  # (r*r, R*R): area down-sampling of a flattened image
                basis = torch.eye(R * R, dtype=torch.float64).reshape(-1, R, R)
                cov = torch.fft.ifft2(self.P * torch.fft.fft2(basis, norm="ortho"), norm="ortho")
                lam, U = torch.linalg.eigh(A @ cov.real.reshape(R * R, R * R) @ A.T)
                lam = lam.clamp(min=1e-12)
                dft = torch.fft.fft2(U.T.reshape(-1, r, r), norm="ortho")  # each eigenvector's DFT
                power = (dft.abs() ** 2 * lam[:, None, None]).sum(0)
                world = Scale(mu, mu.flatten(2) @ U, U, lam, power)
            self._cache[r] = world
        return self._cache[r]

    def _mask(self, y, B):
        """(B, K) log mixture weights, restricted to the components of class y. y=None, or a label
        >= num_classes (the CFG null class), keeps every component."""
        log_pi = self.log_pi.expand(B, -1)
        if y is None:
            return log_pi
        y = y.reshape(-1, 1).cpu()
        keep = (self.comp_class[None, :] == y) | (y >= self.num_classes)
        return (log_pi + torch.where(keep, 0.0, -math.inf)).log_softmax(-1)

    def sample(self, n, res=None, y=None, generator=None):
        """n exact samples (n, C, r, r) and their labels (n,). y: optional (n,) class labels to
        condition on."""
        r = res or self.res
        w = self.scale(r)
        # the component of each sample
        k = torch.multinomial(self._mask(y, n).exp(), 1, generator=generator)[:, 0]
        eps = torch.randn(n, self.channels, r, r, generator=generator, dtype=torch.float64)
        field = w.image(w.lam.sqrt() * w.coefficients(eps))  # white noise, coloured per direction
        return (w.mu[k] + field).float(), self.comp_class[k]

    # ------------------------------------------------------------ exact posterior quantities
    def _posterior(self, x_t, s, y=None):
        """Responsibilities w (B, K), mean E[x0|x_t] and log p_s(x_t), x_t = (1-s) x0 + s eps."""
        B, C, r = x_t.shape[0], x_t.shape[1], x_t.shape[-1]
        world = self.scale(r)
        X = world.coefficients(x_t.double())  # (B, C, n) in the world's basis
        M = world.coef  # (K, C, n)
        a = 1 - torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1).expand(B, 1, 1)
        v = a ** 2 * world.lam + (1 - a) ** 2  # (B, 1, n): variance of x_t given the component
        # Mahalanobis |X - a M|^2 / v, expanded so that no (B, K, C, n) tensor is formed
        xx = (X.abs() ** 2 / v).sum((1, 2))[:, None]  # (B, 1)
        xm = torch.einsum("bcn,kcn->bk", X / v, M.conj()).real  # (B, K)
        mm = torch.einsum("bn,kcn->bk", 1 / v[:, 0], M.abs() ** 2)  # (B, K)
        a1 = a.reshape(-1, 1)
        quad = xx - 2 * a1 * xm + a1 ** 2 * mm  # (B, K)
        logdet = C * v.log().sum((1, 2))[:, None]  # (B, 1)
        log_joint = self._mask(y, B) - 0.5 * (quad + logdet + C * r * r * math.log(2 * math.pi))
        log_p = log_joint.logsumexp(-1)  # (B,)
        w = (log_joint - log_p[:, None]).exp()  # (B, K)
        m_bar = torch.einsum("bk,kcn->bcn", w.to(M.dtype), M)  # posterior-weighted prototype
        x0 = m_bar + (a * world.lam / v) * (X - a * m_bar)  # plus the field's Wiener estimate
        return w, world.image(x0), log_p

    def denoise(self, x_t, s, y=None):
        """Exact posterior mean E[x0 | x_t] (B, C, r, r). s: float or (B,) noise level; y: optional
        labels."""
        return self._posterior(x_t, s, y)[1].to(x_t.dtype)

    def velocity(self, x_t, s, y=None):
        """Exact E[eps - x0 | x_t] = (x_t - E[x0|x_t]) / s, the flow-matching target."""
        s_ = torch.as_tensor(s, dtype=x_t.dtype).reshape(-1, 1, 1, 1)
        return (x_t - self.denoise(x_t, s, y)) / s_

    def log_prob(self, x_t, s, y=None):
        """Exact log-density (nats) of the noised marginal p_s at x_t, constants included: (B,)."""
        return self._posterior(x_t, s, y)[2]

    def euler(self, n, steps, res=None, y=None, generator=None):
        """Probability-flow Euler with the exact velocity, s: 1 -> 0 on a uniform grid. Returns
        (n, C, r, r)."""
        r = res or self.res
        x = torch.randn(n, self.channels, r, r, generator=generator, dtype=torch.float64)
        s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        for i in range(steps):
            x = x + (s[i + 1] - s[i]) * self.velocity(x, s[i], y)  # dx = v ds
        return x.float()

    # ------------------------------------------------------------ exact metrics
    def frechet(self, x):
        """Frechet distance between the Gaussian fit of x (n, C, r, r) and the exact mixture
        moments at resolution r.

        tr sqrt(S^1/2 C1 S^1/2) equals the sum of sqrt(eig(Xc S Xc^T / (n-1))), an n x n problem in
        which S (field + spread of the prototypes) is applied in the eigenbasis.
        """
        n, C, r = x.shape[0], x.shape[1], x.shape[-1]
        world = self.scale(r)
        pi = self.log_pi.exp()
        m = torch.einsum("k,kchw->chw", pi, world.mu)
        d = (world.mu - m).reshape(len(pi), -1)  # (K, D) prototype spread
        X = x.double().reshape(n, -1)
        xc = X - X.mean(0)
        xs = (world.coefficients(xc.reshape(x.shape)) * world.lam.sqrt()).reshape(n, -1)
        if xs.is_complex():  # Re(xs xs^H) as one real product: half a complex one's work
            xs = torch.view_as_real(xs).reshape(n, -1)
        b = (xc @ d.T) * pi.sqrt()  # (n, K)
        M = (xs @ xs.T + b @ b.T) / (n - 1)
        tr_cross = torch.linalg.eigvalsh(M).clamp(min=0).sqrt().sum()
        tr_s = C * world.lam.sum() + (pi[:, None] * d ** 2).sum()
        tr_x = (xc ** 2).sum() / (n - 1)
        return float(((X.mean(0) - m.reshape(-1)) ** 2).sum() + tr_x + tr_s - 2 * tr_cross)

    def assign(self, x, s_read=0.3):
        """Component of each clean image, read at noise level s_read without added noise
        (deterministic).

        Reading at s = 0 is fragile: tiny high-frequency errors look like outliers under the f^-2
        field. x_t = (1-s) x is the mixture with Sigma inflated by (s/(1-s))^2 I, which masks them.
        """
        return self._posterior((1 - s_read) * x.double(), s_read)[0].argmax(-1)

    def evaluate(self, x, s_read=0.3):
        """Exact metrics of generated images x (n, C, r, r): Frechet distance (two-sided fidelity),
        NLL in nats per dimension at s = 0 (one-sided: collapse to the means scores well),
        mode-histogram KL against the true weights, and the number of modes hit."""
        D = x[0].numel()
        K = len(self.log_pi)
        h = torch.bincount(self.assign(x, s_read), minlength=K).double() / len(x)
        kl = (h * (h.clamp(min=1e-12).log() - self.log_pi)).sum()
        nll = -self.log_prob(x, 0.0).mean() / D
        return dict(fd=self.frechet(x), nll=float(nll), mode_kl=float(kl),
                    modes_hit=int((h > 0).sum()))

    def noise_floor(self, n, seed=0):
        """The metrics of n independent exact samples: what a perfect generator scores at this
        sample size."""
        return self.evaluate(self.sample(n, generator=torch.Generator().manual_seed(seed))[0])

    # ------------------------------------------------------------ instruments
    def rings(self):
        """(R, R) integer frequency ring |k| (cycles per image, rounded) of the full resolution."""
        k = torch.fft.fftfreq(self.res, 1 / self.res)
        return (k[:, None] ** 2 + k[None, :] ** 2).sqrt().round().long()

    def ring_gain_sample(self, log_gain, n, generator=None):
        """The smallest generator DMD must be able to train: n samples (n, C, R, R) of the world
        with the texture's amplitude scaled by exp(log_gain[ring]) per frequency ring, with their
        labels; differentiable in log_gain. Its exact law, so its exact fake score, is
        self.with_spectrum(exp(log_gain[rings()]) ** 2 * P)."""
        mu = self.mu.to(log_gain.dtype)
        k = torch.randint(len(mu), (n,), generator=generator)
        eps = torch.randn(n, self.channels, self.res, self.res, generator=generator,
                          dtype=log_gain.dtype)
        amp = log_gain.exp()[self.rings()] * self.P.to(log_gain.dtype).sqrt()
        field = torch.fft.ifft2(amp * torch.fft.fft2(eps, norm="ortho"), norm="ortho").real
        return mu[k] + field, self.comp_class[k]

    def fitted(self, x, s_read=0.3, k=None):
        """The world whose field has the texture spectrum of the samples x (n, C, R, R), ring by
        ring: P times x's texture power over P per frequency ring (texture as in blur_meter). It is
        the exact law of a ring_gain_sample generator and, for any generator, the fake score that
        knows its texture's amplitude per ring and nothing else: a reference for a learned fake
        network's DMD move (the real `denoise` minus this world's is DMD's move with that fake)."""
        assert x.shape[-1] == self.res, "fitted: full-resolution samples only"
        power, rings = self._texture_power(x, s_read, k).flatten(), self.rings()
        ratio = torch.bincount(rings.flatten(), power) / torch.bincount(rings.flatten(), self.P.flatten())
        return self.with_spectrum(self.P * ratio[rings])

    def _texture_power(self, x, s_read=0.3, k=None):
        """(r, r) mean |DFT|^2 of x's texture: x (n, C, r, r) minus its components' prototypes
        (assign, or k if already read), over samples and channels."""
        k = self.assign(x, s_read) if k is None else k
        texture = x.double() - self.scale(x.shape[-1]).mu[k]
        return (torch.fft.fft2(texture, norm="ortho").abs() ** 2).mean((0, 1))

    def blur_meter(self, x, s_read=0.3, k=None):
        """The texture's power against the exact field's, per octave band, in dB (0 dB is right).

        x (n, C, r, r) at any scale r. The texture of a sample is x minus the prototype of its
        component (`assign`, or k if already read); its mean power per band (octave_masks) over the
        exact field's: a blur reads negative, too much texture positive. Band means over hundreds
        of samples and many frequencies are precise where a Frechet distance is not. Returns [dB],
        finest band last.
        """
        r = x.shape[-1]
        power, world = self._texture_power(x, s_read, k), self.scale(r)
        return [10 * math.log10(power[band].mean() / world.power[band].mean())
                for band in octave_masks(r)]

    def texture_alignment(self, x, d, s_read=0.3, k=None, rate=False):
        """Per octave band, the cosine between a change d of the samples x (both (n, C, r, r)) and
        each part of x's texture (x minus its component's prototype, as in blur_meter), over every
        sample and frequency of the band. The random part is x minus its component's mean over x
        (the texture proper), the systematic part that mean minus the prototype (prototype_error's
        mean texture). Moving x along d raises a part where its cosine is > 0 and lowers it where
        < 0; near 0, d does not act on it. For DMD's move mu_real - mu_fake, a blur should read
        random > 0, an edge error systematic < 0. rate=True: Re<d, part> / |part|^2 instead, the
        relative rate at which a step along d scales that part (d log|part| per unit step), which
        adds over moves and weighs their size. Returns {"random": [cosine (or rate) per band],
        "systematic": [...]}, finest band last."""
        r = x.shape[-1]
        k = self.assign(x, s_read) if k is None else k
        mean_tex = self._mean_texture(x, k)[0][k]
        parts = dict(random=x.double() - self.scale(r).mu[k] - mean_tex, systematic=mean_tex)
        D = torch.fft.fft2(d.double(), norm="ortho")
        out = {}
        for name, part in parts.items():
            T, out[name] = torch.fft.fft2(part, norm="ortho"), []
            for band in octave_masks(r):
                t, e = T[..., band], D[..., band]
                norms = float(t.abs().pow(2).sum() if rate else
                              t.abs().pow(2).sum().sqrt() * e.abs().pow(2).sum().sqrt())
                out[name].append(float((e * t.conj()).real.sum()) / norms if norms > 0 else 0.0)
        return out

    def _mean_texture(self, x, k):
        """Each component's mean texture (K, C, r, r), the mean of x - mu_k over the samples of x
        (n, C, r, r) read as component k (assign), and how many those are (K,)."""
        world = self.scale(x.shape[-1])
        count = torch.bincount(k, minlength=len(world.mu)).double()
        sums = torch.zeros_like(world.mu).index_add_(0, k, x.double() - world.mu[k])
        return sums / count.clamp(min=1)[:, None, None, None], count

    def prototype_error(self, x, s_read=0.3, k=None):
        """The systematic part of x's error (n, C, r, r): the squared norm of each hit component's
        mean texture (`fd_parts`), summed over pixels, averaged over the components, and split by
        frequency (unitary FFT): [DC] + one part per octave band (octave_bands), finest last. By
        Parseval the parts sum to the total. A colour cast or a blurred or misplaced edge reads
        here; the blur meter, which keeps it in each sample's texture, reads it as power. Biased up
        by about tr(Sigma) / samples per component (~0.3 at n = 2000). Returns {"total", "bands":
        [DC, band 1, ...]}."""
        r = x.shape[-1]
        mean_tex, count = self._mean_texture(x, self.assign(x, s_read) if k is None else k)
        power = (torch.fft.fft2(mean_tex[count > 0], norm="ortho").abs() ** 2).sum(1).mean(0)
        dc = torch.zeros(r, r, dtype=torch.bool)
        dc[0, 0] = True
        return dict(total=float((mean_tex[count > 0] ** 2).sum((1, 2, 3)).mean()),
                    bands=[float(power[m].sum()) for m in [dc] + octave_masks(r)])

    def fd_parts(self, x, s_read=0.3, seed=0, k=None):
        """Where the Frechet distance of x (n, C, r, r) comes from, split along the world's parts:
        each sample is the prototype of its component (`assign`) plus a texture. Beside x's own
        FD (`evaluate`), returns the FDs of
          prototypes:  x less each component's mean texture (its systematic prototype error);
          modes:       the prototypes of x's components with exact textures (x's mode histogram
                       alone);
          texture:     the prototypes of exact samples with x's textures, less their component
                       means (x's texture alone);
        and prototype_error's total. k: the components of x if already read. On exact samples
        every FD reads the floor (noise_floor)."""
        n, world = len(x), self.scale(x.shape[-1])
        g = torch.Generator().manual_seed(seed)
        x = x.double()
        k = self.assign(x, s_read) if k is None else k
        tex = x - world.mu[k]
        mean_tex, _ = self._mean_texture(x, k)
        exact = self.sample(n, x.shape[-1], y=torch.arange(n) % self.num_classes, generator=g)[0]
        ke = self.assign(exact, s_read)
        shuffle = torch.randperm(n, generator=g)
        return dict(prototypes=self.frechet(x - mean_tex[k]),
                    modes=self.frechet(world.mu[k] + (exact.double() - world.mu[ke])[shuffle]),
                    texture=self.frechet(world.mu[ke] + (tex - mean_tex[k])[shuffle]),
                    prototype_error=self.prototype_error(x, k=k)["total"])

    @torch.no_grad()
    def denoising_error(self, x0_of, r, s, n=256, seed=0):
        """x0-MSE of a denoiser x0_of(x_t, s, y) and of the exact (Bayes-optimal) one on the same
        noisy area-downsampled samples at resolution r: (model, exact)."""
        g = torch.Generator().manual_seed(seed)
        x0, y = self.sample(n, r, generator=g)
        x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
        exact = self.denoise(x_t.double(), s, y).float()
        return F.mse_loss(x0_of(x_t, s, y).float(), x0).item(), F.mse_loss(exact, x0).item()

    @torch.no_grad()
    def dmd_gradient_at_data(self, x0_of, levels, r=None, n=256, seed=0):
        """RMS of the normalised DMD gradient g = (mu_fake - mu_real) / mean|x0 - mu_real| on *real*
        images, with x0_of(x_t, s, y) as a fake score that has learned the data and the exact
        denoiser as the real score. The ideal g there is 0: what is measured is the stand-in's
        error, which DMD turns into a push away from the data. Returns [RMS g for s in levels]."""
        g = torch.Generator().manual_seed(seed)
        x0, y = self.sample(n, r, generator=g)
        out = []
        for s in levels:
            x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
            mu_real = self.denoise(x_t.double(), s, y).float()
            gd = (x0_of(x_t, s, y).float() - mu_real) / (x0 - mu_real).abs().mean((1, 2, 3), True)
            out.append(float(gd.pow(2).mean().sqrt()))
        return out

    @torch.no_grad()
    def mode_entropy(self, r, levels, n=512, seed=0):
        """Entropy (bits) of the exact posterior's within-class component weights at each noise
        level s, for real images at resolution r: [entropy for s in levels].

        DMD can move probability between two modes of a class only at levels where x_t does not yet
        tell them apart (entropy > 0); 1 bit = two equally likely components.
        """
        g = torch.Generator().manual_seed(seed)
        x0, y = self.sample(n, r, generator=g)
        out = []
        for s in levels:
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            w = self._posterior((1 - s) * x0.double() + s * eps, s, y)[0]  # (n, K), 0 off the class
            bits = -(w * w.clamp(min=1e-300).log2()).sum(-1).mean()
            out.append(max(0.0, float(bits)))  # max: no -0.00
        return out

    @torch.no_grad()
    def posterior_mean_chain(self, scales, levels, y, generator=None):
        """The scale-wise sampler (SwD section 3) with the exact posterior mean as its generator, no
        network at all: what a student must beat to have learned more than the sampler.
        Returns every step's x0_hat, [(n, C, r_i, r_i)], written independently of swd_mini."""
        x = torch.randn(len(y), self.channels, scales[0], scales[0], generator=generator)
        steps = []
        for i, s in enumerate(levels):
            steps.append(self.denoise(x.double(), s, y).float())
            if i + 1 < len(scales):  # upsample the clean estimate (bicubic), then fresh noise
                r = scales[i + 1]
                up = F.interpolate(steps[-1], size=(r, r), mode="bicubic", align_corners=False)
                x = (1 - levels[i + 1]) * up + levels[i + 1] * torch.randn(up.shape,
                                                                           generator=generator)
        return steps

    def curve_row(self, steps, parts=True):
        """One learning-curve row from a sampler's steps [x0_hat at each scale], the last at full
        resolution: exact FD, its parts (fd_parts, unless parts=False) and mode KL of the last; the
        blur meter and the prototype error's bands (prototype_error) at every scale."""
        m = self.evaluate(steps[-1].float().cpu())
        meter, proto = {}, {}
        for x in steps:  # one component reading per scale serves every instrument
            x = x.float().cpu()
            k = self.assign(x)
            meter[x.shape[-1]] = self.blur_meter(x, k=k)
            proto[x.shape[-1]] = self.prototype_error(x, k=k)["bands"]
        row = dict(fd=m["fd"], mode_kl=m["mode_kl"], meter=meter, proto=proto)
        return dict(row, parts=self.fd_parts(x, k=k)) if parts else row  # x, k: the last step's


class ExactVelocity(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t], called like a DiT (x, s, y): the perfect real score."""

    def __init__(self, toy):
        super().__init__()
        self.toy, self.num_classes = toy, toy.num_classes

    @torch.compiler.disable  # float64 maths on the CPU: a compiled caller calls it, never traces it
    def forward(self, x, s, y):
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return self.toy.velocity(x.detach().cpu().double(), s.cpu(), y.cpu()).to(x)


# ------------------------------------------------------------ the toy lab: exact references
def save_scale_grid(teacher, path, scales=(8, 16, 24, 32), n=8, seed=0):
    """One row per scale (nearest-upsampled to full size for display), the same component order
    in each row."""
    from torchvision.utils import save_image  # lazy: the world itself needs torch only

    rows = []
    for r in scales:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % teacher.num_classes
        x, _ = teacher.sample(n, r, y=y, generator=g)
        rows.append(F.interpolate(x, size=64, mode="nearest"))  # 64 px for display
    save_image(torch.cat(rows) * 0.5 + 0.5, path, nrow=n, padding=1)


def reference_rows(t, n, steps=(1, 2, 4, 8, 32), seed=0):
    """[(name, curve_row)] of exact samples, exact Euler at each step count and the exact
    posterior-mean scale-wise chains: the numbers a distilled student is judged against."""
    g = torch.Generator().manual_seed
    y = torch.arange(n) % t.num_classes
    rows = [("exact samples (floor)", t.curve_row([t.sample(n, y=y, generator=g(seed + 1))[0]]))]
    rows += [(f"exact Euler, {k} steps", t.curve_row([t.euler(n, k, y=y, generator=g(seed + 2))]))
             for k in steps]
    chains = (("chain 8-32 px, s 1,.75,.5,.25", (8, 16, 24, 32), (1, .75, .5, .25)),
              ("chain 8-32 px, s 1,.9,.75,.6", (8, 16, 24, 32), (1, .9, .75, .6)),
              ("chain 16,32 px, s 1,.5", (16, 32), (1, .5)),
              ("chain 32 px x4, s 1,.75,.5,.25", (32,) * 4, (1, .75, .5, .25)))
    for name, scales, levels in chains:
        rows.append((name, t.curve_row(t.posterior_mean_chain(scales, levels, y, g(seed + 3)))))
    return rows


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="The toy lab: a sample grid per scale and the exact "
                                "reference table (FD, mode KL, blur meter at full resolution).")
    p.add_argument("--grid", default="assets/toy_world.png",
                   help="where to write the per-scale sample grid")
    p.add_argument("--n", type=int, default=2000, help="samples per row")
    a = p.parse_args()
    t = ToyTeacher()
    save_scale_grid(t, a.grid)
    print(f"wrote {a.grid}")
    bands = ", ".join(f"{lo:g}-{hi:g}" for lo, hi in octave_bands(t.res))
    print(f"{'sampler':32s} {'FD':>7s} {'prototypes/modes/texture':>24s} {'mode KL':>8s}   "
          f"blur meter, dB at {bands} cycles/image"
          f"   (n = {a.n}, class-balanced)")
    for name, row in reference_rows(t, a.n):
        db = " ".join(f"{v:+6.2f}" for v in row["meter"][t.res])
        parts = " / ".join(f"{row['parts'][k]:5.1f}" for k in ("prototypes", "modes", "texture"))
        print(f"{name:32s} {row['fd']:7.2f}    {parts} {row['mode_kl']:8.4f}   {db}")
