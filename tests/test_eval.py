"""Evaluation and benchmarks: the scale-resolved and spectral distances, the FID notice, and the files that
--stage eval, bench and report write."""
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

import swd_mini as sm
from toy_teacher import ToyTeacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian_blur(x, sigma):
    k = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), (k[:, None] * k[None]).expand(3, 1, 7, 7), groups=3)


# ------------------------------------------------------------------ distances
def test_laplacian_pyramid_reconstructs_the_image():
    """Bands plus the residual, each expanded back up and added, give the image again (an exact identity)."""
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    levels = sm.laplacian_pyramid(x, min_res=8)
    assert [r for r, _ in levels] == [32, 16, 8]
    rec = levels[-1][1]
    for _, band in reversed(levels[:-1]):
        up = torch.zeros_like(band)
        up[..., ::2, ::2] = rec
        rec = band + 4 * sm.pyramid_blur(up)
    assert torch.allclose(rec, x, atol=1e-12)


def test_sliced_wasserstein_of_a_shift_is_its_mean_projection():
    """Shifting a point set by t moves every projection on unit d by <t, d>: SW = E|<t, d>|, which for
    uniform directions in 3-D is |t| / 2."""
    a = torch.randn(4000, 3, dtype=torch.float64)
    t = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)  # |t| = 1
    assert sm.sliced_wasserstein(a, a, 256, gen(0)) == 0
    assert abs(sm.sliced_wasserstein(a + t, a, 4096, gen(1)) - 0.5) < 0.02


def test_pyramid_swd_is_small_for_two_halves_and_grows_with_blur():
    x = ToyTeacher().sample(1200, generator=gen(0))[0]
    a, b = x[:600], x[600:]
    halves = sm.pyramid_swd(a, b)
    mild, strong = sm.pyramid_swd(gaussian_blur(a, 0.7), b), sm.pyramid_swd(gaussian_blur(a, 1.5), b)
    assert list(halves) == [32, 16, 8]
    assert halves[32] < 0.2 * mild[32] and mild[32] < strong[32]  # the finest band sees blur first
    assert halves[16] < strong[16]
    assert sum(halves.values()) < sum(mild.values()) < sum(strong.values())


def test_spectral_distance_zero_for_identical_sets_and_3db_for_double_power():
    x = ToyTeacher().sample(64, generator=gen(1))[0]
    assert sm.spectral_distance(x, x) == 0
    assert abs(sm.spectral_distance(math.sqrt(2) * x, x) - 10 * math.log10(2)) < 1e-5  # float32 images


def test_fid_absent_gives_the_notice_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "cleanfid", None)
    x = torch.zeros(4, 3, 32, 32)
    value, notice = sm.compute_fid(x, x, torch.device("cpu"), str(tmp_path))
    assert value is None and "pip install torch-fidelity" in notice and "\n" not in notice
    m = sm.image_metrics(x, x, sm.make_config(["--preset", "smoke"]), torch.device("cpu"))
    assert "fid" not in m and m["fid_notice"] == notice


# ------------------------------------------------------------------ files
def documented_keys(name):
    """The keys swd_mini.py documents for a file, in the docstring of the stage that writes it: the
    backticked names of its bullet `- `name`: ...`, which may run on over the following lines."""
    text = open(os.path.join(ROOT, "swd_mini.py")).read()
    m = re.search(rf"^ *- `{name}`[^:]*:(.*?)(?=^ *- |^ *$|^ *\"\"\")", text, re.M | re.S)
    assert m, f"swd_mini.py documents no keys for {name}"
    return set(re.findall(r"`([a-z_0-9]+)`", m.group(1)))


def test_report_runs_everything_and_writes_documented_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "cleanfid", None)
    out, readme = str(tmp_path / "run"), str(tmp_path / "README.md")
    open(readme, "w").write("# title\n\ntext before\n")
    args = ["--preset", "smoke", "--stage", "report", "--out_dir", out, "--readme", readme, "--bench_repeats", "1",
            "--bench_n", "8", "--eval_batch", "32"]
    sm.main(args)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert documented_keys("metrics.json") == set(metrics)
    names = [r["name"] for r in metrics["samplers"]]
    assert names[0] == "data (floor)" and "SwD, 4 steps [swd]" in names and "DMD2 full-res, 4 steps [dmd2_full_res]" in names
    assert len(set(names)) == len(names)  # every variant has its own name
    for row in metrics["samplers"]:  # every key written is documented, and the core ones are always there
        assert {"name", "nfe", "swd", "swd_mean", "spectral_db"} <= set(row) <= documented_keys("metrics.json samplers")
        assert "fid_notice" in row and "fid" not in row
    bench = json.load(open(os.path.join(out, "bench.json")))
    assert documented_keys("bench.json") == set(bench)
    for part in ("sampling", "training", "teacher"):
        assert documented_keys(f"bench.json {part}") - {"median", "min", "max"} == set(bench[part]), part
    assert bench["training"]["swd_iter_s"]["min"] <= bench["training"]["swd_iter_s"]["median"]
    # the claims block: five rows, spliced into the README once, and replaced (not repeated) on a second run
    text = open(readme).read()
    assert text.startswith("# title\n\ntext before\n") and text.count("<!-- report:smoke -->") == 1
    assert all(f"**C{i}**" in text for i in range(1, 6))
    sm.splice_report(readme, "<!-- report:smoke -->\nnew\n<!-- /report:smoke -->", "smoke")
    text = open(readme).read()
    assert text.count("<!-- report:smoke -->") == 1 and "\nnew\n" in text and "**C1**" not in text


# ------------------------------------------------------------------ the claims
def test_each_claim_is_judged_by_its_stated_criterion():
    """All five pass on numbers that meet the criteria; breaking one number fails exactly its claim."""
    c = sm.make_config(["--preset", "toy"])

    def judge(fd=None, order_b=0.08, ratio=0.45, curve=(0.5, 0.2, 0.08, 1 / 32, 1 / 32)):
        fd = dict(dict(swd=98, dmd2=194, nop=144, e4=142, e32=98.5), **(fd or {}))
        names = {"swd": "SwD, 4 steps [swd]", "dmd2": "DMD2 full-res, 4 steps [dmd2_full_res]",
                 "nop": "SwD w/o patch loss, 4 steps [swd_no_patch]",
                 "e4": "teacher Euler, 4 steps", "e32": "teacher Euler, 32 steps"}
        metrics = dict(samplers=[dict(name="data (floor)", fd=17.0)] + [dict(name=names[k], fd=v) for k, v in fd.items()])
        spectra = dict(levels=[dict(s=s, crossover=k) for s, k in zip((0.2, 0.5, 0.8, 0.95), curve[1:])],
                       crossover_curve=dict(s=[0.02, 0.2, 0.5, 0.8, 0.95], k=list(curve)), data=dict(freqs=[1 / 32, 0.5]),
                       order={"s": 0.75, "res_from": 16, "res_to": 32, "true x_t": dict(denoise_mse=0.040, spectral_db=0.0),
                              "(a) up, then noise": dict(denoise_mse=0.041, spectral_db=0.01),
                              "(b) noise, then up": dict(denoise_mse=order_b, spectral_db=9.0)})
        bench = dict(sampling=dict(measured_ratio=ratio, analytic_ratio_flops=0.45))
        return [ok for *_, ok in sm.judge_claims(c, metrics, spectra, bench)]

    assert judge() == [True] * 5
    assert judge(curve=(0.5, 0.2, 0.25, 1 / 32, 1 / 32)) == [False, True, True, True, True]  # k* rises once
    assert judge(order_b=0.045) == [True, False, True, True, True]  # (b) barely worse than (a)
    assert judge(ratio=0.6) == [True, True, False, True, True]  # too slow
    assert judge(fd=dict(dmd2=80)) == [True, True, False, True, True]  # DMD2 much better
    assert judge(fd=dict(nop=90)) == [True, True, True, False, True]  # without the patch loss is better
    assert judge(fd=dict(e4=110)) == [True, True, True, True, False]  # not far better than Euler 4
    assert judge(fd=dict(e32=60)) == [True, True, True, True, False]  # not close to Euler 32


# ------------------------------------------------------------------ what limits distillation
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

    class Exact(torch.nn.Module):  # the exact velocity; skip=False is its c_out F part, here all of it
        def forward(self, x, s, y, skip=True):
            return toy.velocity(x.double(), s, y).float() if skip else torch.zeros_like(x)

    assert max(sm.dmd_gradient_at_data(Exact(), toy, c, [0.1, 0.5, 0.9], n=32)) < 1e-3
    assert max(sm.dmd_gradient_at_data(Exact(), toy, c, [0.1, 0.5, 0.9], n=32, residual=True)) < 1e-3
    net = sm.DiT.from_config(c).eval()  # untrained: its DMD gradient at the data is far from 0
    assert min(sm.dmd_gradient_at_data(net, toy, c, [0.1, 0.5, 0.9], n=32)) > 0.1


def test_diagnose_stage_writes_the_posterior_mean_rows(tmp_path):
    sm.main(["--preset", "smoke", "--stage", "diagnose", "--teacher", "toy", "--out_dir", str(tmp_path),
             "--eval_n", "200"])
    out = json.load(open(tmp_path / "diagnose.json"))
    rows = {r["name"]: r for r in out["posterior_mean"]}
    # the exact posterior mean with SD3.5's levels ends at s = 0.6 and blurs what is left: worse than DMD2's
    assert rows["SwD, SD3.5 levels"]["fd"] > rows["full-res, DMD2 levels"]["fd"]
    assert len(out["rms_dmd_gradient_at_data"]) == len(out["levels"])
