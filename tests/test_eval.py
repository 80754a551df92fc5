"""Evaluation and benchmarks: the patch and spectral distances, FID's maths and its library path on
fabricated weights, the files --stage eval, sample and bench write, and the toy world's instruments."""
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import torch
import torch.nn.functional as F

import swd_mini as sm
from toy_teacher import ToyTeacher, octave_bands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian_blur(x, sigma):
    k = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), (k[:, None] * k[None]).expand(3, 1, 7, 7), groups=3)


# ------------------------------------------------------------------ distances
def test_band_power_reads_zero_on_a_second_draw_and_the_finest_band_goes_first_under_blur():
    x = ToyTeacher().sample(1200, generator=gen(0))[0]
    a, b = x[:600], x[600:]
    same, mild, strong = (sm.band_power_db(z, b) for z in (a, gaussian_blur(a, 0.7), gaussian_blur(a, 1.5)))
    assert len(same) == 4 and max(abs(v) for v in same) < 0.2  # cycles/image: [1,2) [2,4) [4,8) [8,inf)
    assert mild[-1] < -1 and strong[-1] < mild[-1] and mild[-1] < mild[0]  # blur: the finest band first
    assert all(abs(v - 20 * math.log10(1.2)) < 1e-3 for v in sm.band_power_db(1.2 * b, b))  # +1.58 dB


@pytest.mark.parametrize("r", [4, 8, 16, 24, 32])
def test_band_power_takes_the_blur_meters_octave_bands_at_every_scale(r):
    """Amplitude gain g_b on the frequencies of toy_teacher's band b (an independent definition of the
    bands) must read 20 log10 g_b in band b of band_power_db; a 24 px reading of 3 bands fails."""
    ref = torch.randn(64, 3, r, r, generator=gen(r), dtype=torch.float64)
    k = torch.fft.fftfreq(r, 1 / r, dtype=torch.float64)
    radius = (k[:, None] ** 2 + k[None, :] ** 2).sqrt()
    gains, field = [1.5 ** (b + 1) for b in range(len(octave_bands(r)))], torch.ones(r, r)
    for g, (low, high) in zip(gains, octave_bands(r)):
        field[(radius >= low) & (radius < high)] = g
    x = torch.fft.ifft2(torch.fft.fft2(ref) * field).real  # the field is symmetric: x stays real
    read = sm.band_power_db(x, ref)
    assert len(read) == len(gains)
    assert all(abs(v - 20 * math.log10(g)) < 1e-9 for v, g in zip(read, gains))


def test_pixel_fd_is_the_frechet_distance_of_pixel_moments():
    x = ToyTeacher(channels=1).sample(400, 8, generator=gen(5))[0]
    m = sm.image_metrics(x[:200], x[200:])
    torch.testing.assert_close(torch.tensor(m["fd"]), torch.tensor(sm.frechet_distance(
        *sm.moments(x[:200]), *sm.moments(x[200:]))))
    assert sm.image_metrics(0.5 * x[:200], x[200:])["fd"] > 3 * m["fd"]


def test_spectral_distance_zero_for_identical_sets_and_3db_for_double_power():
    x = ToyTeacher().sample(64, generator=gen(1))[0]
    assert sm.spectral_distance(x, x) == 0
    assert abs(sm.spectral_distance(math.sqrt(2) * x, x) - 10 * math.log10(2)) < 1e-5  # float32 images


# ------------------------------------------------------------------ FID
def test_frechet_distance_of_known_gaussians():
    # commuting covariances: |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2 over the shared eigenbasis
    g = gen(2)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    l1, l2 = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    c1, c2 = Q @ torch.diag(l1) @ Q.T, Q @ torch.diag(l2) @ Q.T
    want = ((mu1 - mu2) ** 2).sum() + ((l1.sqrt() - l2.sqrt()) ** 2).sum()
    assert abs(sm.frechet_distance(mu1, c1, mu2, c2) - want.item()) < 1e-10
    # general ones: tr sqrt(C1 C2) is the sum of the square roots of C1 C2's (real, positive) eigenvalues
    A, B = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    c1, c2 = A @ A.T + 0.1 * torch.eye(5), B @ B.T
    cross = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0).sqrt().sum()
    want = ((mu1 - mu2) ** 2).sum() + c1.trace() + c2.trace() - 2 * cross
    assert abs(sm.frechet_distance(mu1, c1, mu2, c2) - want.item()) < 1e-8
    assert abs(sm.frechet_distance(mu1, c1, mu1, c1)) < 1e-8


def png_folder(path, x):
    from torchvision.utils import save_image
    os.makedirs(path, exist_ok=True)
    for j, img in enumerate(x):
        save_image((img + 1) / 2, os.path.join(path, f"{j:06d}.png"))
    return str(path)


def test_fid_absent_gives_the_notice_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import raises ImportError
    folder = png_folder(tmp_path / "a", torch.zeros(2, 3, 8, 8))
    value, notice = sm.compute_fid(folder, folder, torch.device("cpu"))
    assert value is None and "pip install torch-fidelity" in notice and "\n" not in notice


def random_inception(path):
    """A randomly initialised torchvision Inception v3 saved to a local file and loaded back: the
    fabricated weights of the offline FID test. Returns features(uint8 (B, 3, H, W)) -> (B, 2048)."""
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True).state_dict(), path)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.fc = torch.nn.Identity()
    net.eval()
    # a random network's features reach 1e8: unit vectors keep the Frechet distance well-conditioned
    return lambda x: F.normalize(net(F.interpolate(x.float() / 127.5 - 1, size=299, mode="bilinear")).detach())


def test_fid_path_offline_with_fabricated_inception_weights(tmp_path):
    features = random_inception(str(tmp_path / "inception.pt"))
    x = ToyTeacher().sample(24, generator=gen(3))[0].clamp(-1, 1)
    a, b = png_folder(tmp_path / "a", x[:12]), png_folder(tmp_path / "b", 0.2 * x[12:])
    same, _ = sm.compute_fid(a, a, torch.device("cpu"), features=features)
    other, notice = sm.compute_fid(a, b, torch.device("cpu"), features=features)
    assert notice is None and abs(same) < 1e-6 < other
    from PIL import Image  # the same number from the parts: PNGs -> uint8 -> features -> moments
    fa, fb = (sm.moments(features(torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(p, f)).convert(
        "RGB")) for f in sorted(os.listdir(p))])).permute(0, 3, 1, 2))) for p in (a, b))
    assert abs(sm.frechet_distance(*fa, *fb) - other) < 1e-9


def test_fid_through_torch_fidelity_on_fabricated_weights(tmp_path, monkeypatch):
    """The library path itself: torch-fidelity's own InceptionV3 with random weights from a local
    file (--fid_weights), so nothing is downloaded."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})  # build it unloaded
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    torch.save(fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), tmp_path / "w.pth")
    monkeypatch.undo()
    x = ToyTeacher().sample(24, generator=gen(4))[0].clamp(-1, 1)
    a, b = png_folder(tmp_path / "a", x[:12]), png_folder(tmp_path / "b", 0.2 * x[12:])
    value, notice = sm.compute_fid(a, b, torch.device("cpu"), str(tmp_path / "w.pth"))
    assert notice is None and value > 0


# ------------------------------------------------------------------ files
def documented_keys(name):
    """The keys swd_mini.py documents for a file, in the docstring of the stage that writes it: the
    backticked names of its bullet `- `name`: ...`, which may run on over the following lines."""
    text = open(os.path.join(ROOT, "swd_mini.py")).read()
    m = re.search(rf"^ *- `{name}`[^:]*:(.*?)(?=^ *- |^ *$|^ *\"\"\")", text, re.M | re.S)
    assert m, f"swd_mini.py documents no keys for {name}"
    return set(re.findall(r"`([a-z_0-9]+)`", m.group(1)))


def test_eval_sample_and_bench_write_their_documented_files(tmp_path):
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "eval", "--out_dir", out, "--teacher", "toy", "--eval_batch", "32"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert documented_keys("metrics.json") == set(metrics)
    names = [r["name"] for r in metrics["samplers"]]
    assert names == ["data (floor)", "exact teacher Euler, 4 steps", "exact teacher Euler, 2 steps", "SwD, 4 steps"]
    for row in metrics["samplers"]:  # every key written is documented, and the core ones are always there
        assert {"name", "nfe", "fd", "bands", "spectral_db", "mode_kl"} <= set(row) <= documented_keys(
            "metrics.json samplers")
    sm.main(["--preset", "smoke", "--stage", "bench", "--out_dir", out, "--bench_repeats", "1", "--bench_n", "8"])
    bench = json.load(open(os.path.join(out, "bench.json")))
    assert documented_keys("bench.json") == set(bench)
    for part in ("ops", "seconds", "sampling"):
        assert documented_keys(f"bench.json {part}") >= set(bench[part]), part
    assert {"ops", "host_syncs"} <= documented_keys("bench.json ops")
    assert bench["ops"]["swd"]["host_syncs"] == 0 and bench["ops"]["swd"]["ops"] > 100
    assert 0 < bench["sampling"]["macs_ratio"] < 1
    sm.main(["--preset", "smoke", "--stage", "bench", "--out_dir", out, "--bench_repeats", "0"])
    untimed = json.load(open(os.path.join(out, "bench.json")))  # counts, no clock
    assert untimed["seconds"] is None and untimed["ops"] == bench["ops"]
    assert bench["ops_compiled"] is None  # counted only with --compile true on the CPU


# ------------------------------------------------------------------ the toy world's instruments
def test_mode_entropy_falls_with_the_noise_and_is_decided_later_at_low_resolution():
    """At s -> 0 every image's component is certain; at s -> 1 the two components of its class are near
    equally likely. At every level the 8 px world has decided less than the 32 px one: fewer pixels carry
    less evidence, which is why full-resolution DMD gets no mode-balance signal below s ~ 0.9."""
    toy = ToyTeacher()
    levels = [0.02, 0.5, 0.8, 0.9, 0.98]
    low, full = toy.mode_entropy(8, levels, n=256), toy.mode_entropy(32, levels, n=256)
    assert low[0] < 1e-3 and full[0] < 1e-3 and low[-1] > 0.9 and full[-1] > 0.6
    assert all(a >= b - 0.02 for a, b in zip(low, full)) and low[2] > full[2] + 0.2
    assert all(b >= a - 0.02 for a, b in zip(full, full[1:]))  # more noise, less decided


def test_dmd_gradient_at_data_is_zero_for_the_exact_score_and_not_for_a_network():
    toy, c = ToyTeacher(), sm.make_config(["--preset", "smoke"])
    levels = [0.1, 0.5, 0.9]
    assert max(toy.dmd_gradient_at_data(lambda x, s, y: toy.denoise(x.double(), s, y), levels, n=32)) < 1e-3
    net = sm.DiT.from_config(c).eval()  # untrained: its DMD gradient at the data is far from 0

    def x0_of(x, s, y):
        with torch.no_grad():
            return sm.to_x0(x, s, net(x, s, y))
    assert min(toy.dmd_gradient_at_data(x0_of, levels, n=32)) > 0.1


def test_sample_dump_writes_pngs_and_npz_and_a_stopped_run_completes_without_duplicates(tmp_path):
    out = str(tmp_path / "run")
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out])
    ckpt, args = os.path.join(out, "student.pt"), ["--eval_batch", "40"]
    whole = str(tmp_path / "whole")
    sm.main(["--preset", "smoke", "--stage", "sample", "--ckpt", ckpt, "--n", "400", "--out_dir", whole] + args)
    pngs = sorted(os.listdir(os.path.join(whole, "samples")))
    assert pngs == [f"{k:06d}.png" for k in range(400)]
    with np.load(os.path.join(whole, "samples.npz")) as f:
        x, labels = f["arr_0"], f["labels"]
    assert x.shape == (400, 32, 32, 3) and x.dtype == np.uint8 and labels.tolist() == [k % 4 for k in range(400)]
    # a run stopped part-way (SIGINT, like Ctrl-C), then rerun: the same set, nothing twice
    stopped = str(tmp_path / "stopped")
    cmd = [sys.executable, os.path.join(ROOT, "swd_mini.py"), "--preset", "smoke", "--stage", "sample", "--ckpt",
           ckpt, "--n", "400", "--out_dir", stopped] + args
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # (SIG_DFL: a shell's background job starts with SIGINT ignored, and Python keeps it ignored)
    folder = os.path.join(stopped, "samples")
    while proc.poll() is None and (not os.path.isdir(folder) or len(os.listdir(folder)) < 40):
        pass
    for sig in (signal.SIGSTOP, signal.SIGINT, signal.SIGCONT):  # held still: it cannot finish first
        proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert "Traceback" not in err
    assert 0 < len(os.listdir(folder)) < 400 and not os.path.exists(os.path.join(stopped, "samples.npz"))
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    assert sorted(os.listdir(folder)) == pngs
    with np.load(os.path.join(stopped, "samples.npz")) as f:
        assert np.array_equal(f["arr_0"], x) and np.array_equal(f["labels"], labels)
