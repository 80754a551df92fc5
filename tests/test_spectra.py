"""rapsd: the radially averaged power spectral density, checked on spectra with known answers."""
import json

import pytest
import torch

import swd_mini as sm
from toy_teacher import ToyTeacher


def test_white_noise_is_flat_at_its_variance():
    v = 0.37
    f, p = sm.rapsd(v ** 0.5 * torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert f[0] == 1 / 32 and f[-1] == 0.5 and len(f) == 16
    assert ((p / v - 1).abs() < 0.05).all()


def test_power_law_field_returns_its_exponent():
    # the toy world's field has P(f) ~ (f^2 + f0^2)^-1; far above f0 the log-log slope must be ~ -2
    t = ToyTeacher(res=64, num_classes=1, per_class=1, channels=1, field_std=1.0)
    eps = torch.randn(256, 1, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    field = torch.fft.ifft2(t.P.sqrt() * torch.fft.fft2(eps, norm="ortho"), norm="ortho").real
    f, p = sm.rapsd(field)
    keep = f >= 4 / 64
    A = torch.stack([f[keep].log(), torch.ones(int(keep.sum()), dtype=torch.float64)], 1)
    slope = torch.linalg.lstsq(A, p[keep].log()[:, None]).solution[0].item()
    assert abs(slope + 2) < 0.1, slope


def test_constant_image_has_power_only_at_dc():
    f, p = sm.rapsd(torch.full((2, 1, 16, 16), 0.7))
    assert p.abs().max() < 1e-20  # rapsd leaves out DC; nothing else may carry power


def test_crossover_of_a_power_law_has_the_closed_form():
    # P(k) = k^-2: (1-s)^2 k^-2 = s^2  =>  k* = (1-s)/s, exact under log-log interpolation
    f = torch.arange(1, 17, dtype=torch.float64) / 32
    P = f ** -2
    for s in (0.7, 0.8, 0.9):
        assert abs(sm.crossover(f, P, s) - (1 - s) / s) < 1e-9
    # k* falls as s rises, and saturates at the ends of the band
    assert sm.crossover(f, P, 0.01) == f[-1] and sm.crossover(f, P, 0.99) == f[0]


def test_auto_schedule_known_answer_and_margin():
    f = torch.arange(1, 17, dtype=torch.float64) / 32
    P = f ** -2 / 1024  # P(5/32) = 1/25, P(9/32) = 1/81
    # 16 -> 32 px: first ring above 16/64 is 9/32, P_i = 1/81, q = sqrt(4/81) = 2/9, s = q / (1 + q) = 2/11
    assert sm.auto_schedule(f, P, [16, 32], margin=4.0) == [1.0, pytest.approx(2 / 11, abs=1e-12)]
    # 8 -> 16 px alone would ask: first ring above 8/64 is 5/32, P_i = P (16/32)^2 = 1/100, q = 0.2, s = 1/6
    sig = sm.auto_schedule(f, P, [8, 16, 32], margin=4.0)
    assert sig[0] == 1.0
    for i, (prev, r) in enumerate(zip([8, 16], [16, 32]), 1):  # the defining inequality holds everywhere above
        above = f > prev / 64
        assert ((1 - sig[i]) ** 2 * P[above] * (r / 32) ** 2 <= sig[i] ** 2 / 4 + 1e-15).all()
    # k^-2 with doubling scales is scale-invariant: step 3 asks slightly more (ring rounding), and step 2 is
    # raised to it so that levels never rise
    assert sig[1] == sig[2] == pytest.approx(2 / 11)
    steep = sm.auto_schedule(f, f ** -3 / 1024, [8, 16, 24, 32], margin=4.0)
    assert all(a > b for a, b in zip(steep, steep[1:]))  # steeper spectra: finer steps need less noise
    lo, hi = sm.auto_schedule(f, P, [8, 16, 32], 1.0), sm.auto_schedule(f, P, [8, 16, 32], 9.0)
    assert all(a < b for a, b in zip(lo[1:], hi[1:]))  # a larger margin asks for more noise


def test_spectra_stage_writes_its_files(tmp_path):
    sm.main(["--preset", "smoke", "--stage", "spectra", "--out_dir", str(tmp_path)])
    for name in ("spectra_1_noise.png", "spectra_2_order.png", "spectra.json"):
        assert (tmp_path / name).stat().st_size > 100
    out = json.load(open(tmp_path / "spectra.json"))
    assert len(out["auto_levels"]) == 4 and out["auto_levels"][0] == 1.0
    assert set(out["order"]) == {"true x_t", "(a) up, then noise", "(b) noise, then up"}


def test_claim_1_the_crossover_falls_as_the_noise_rises():
    """SwD section 2 on the exact toy world: k*(s) never rises over 60 levels and falls strictly
    wherever it lies between Nyquist and the lowest ring, so noisier steps need fewer pixels."""
    x0 = ToyTeacher().sample(2000, generator=torch.Generator().manual_seed(0))[0]
    f, P = sm.rapsd(x0)
    ks = [sm.crossover(f, P, float(s)) for s in torch.linspace(0.02, 0.99, 60)]
    assert all(b <= a for a, b in zip(ks, ks[1:]))
    inside = [k for k in ks if f[0] < k < f[-1]]  # between Nyquist and the lowest ring
    assert len(inside) > 30 and all(b < a for a, b in zip(inside, inside[1:]))
    assert ks[0] > 4 * ks[-1]


def test_claim_2_upsample_then_noise_is_a_true_x_t_and_noise_then_upsample_is_not():
    """SwD table 1 with the exact denoiser: (a) upsampling the clean image, then adding fresh noise,
    gives a true x_t's spectrum and nearly its denoising error; (b) noise, then upsampling, loses
    the top octave (9 dB) and costs the exact denoiser a third more error."""
    t = ToyTeacher()
    x0, y = t.sample(512, generator=torch.Generator().manual_seed(0))
    order = sm.order_experiment(x0, y, t.denoise, s=0.5, g=torch.Generator().manual_seed(1))
    (truth, mse_t), (a, mse_a), (b, mse_b) = order.values()
    assert sm.spectral_distance(a, truth) < 0.1 < 5 < sm.spectral_distance(b, truth)
    assert mse_a < 1.05 * mse_t and mse_b > 1.25 * mse_a


def test_schedule_auto_trains_with_the_levels_the_spectrum_gives(tmp_path):
    """--schedule auto: the teacher checkpoint's config holds auto_schedule's levels for this data."""
    sm.main(["--preset", "smoke", "--stage", "teacher", "--schedule", "auto", "--out_dir", str(tmp_path)])
    c = sm.make_config(["--preset", "smoke"])
    f, P = sm.rapsd(sm.Data(c, torch.device("cpu")).batch(512, sm.seeded(c.seed))[0])
    want = sm.auto_schedule(f, P, c.scales, c.schedule_margin)
    saved = sm.load_checkpoint(str(tmp_path / "teacher.pt"), "teacher")["config"]["levels"]
    assert saved == pytest.approx(want) and saved != c.levels
