"""swd_mini part 2: the scale-wise sampler, the SwD losses, and distillation end to end."""
import dataclasses
import json
import math
import os
import shutil
from types import SimpleNamespace

import torch

import swd_mini as sm
from toy_teacher import ToyTeacher, octave_bands


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ sampler
def test_scale_wise_sampler_resolutions_levels_and_renoising():
    calls = []

    def denoise(x, s):  # records what the generator sees, predicts a clean image of zeros
        calls.append((x.shape[-1], s, x.std().item()))
        return torch.zeros_like(x)

    scales, sigmas = [8, 16, 24, 32], [1.0, 0.9, 0.75, 0.6]
    out, traj = sm.scale_wise_sample(denoise, torch.randn(256, 3, 8, 8), scales, sigmas, gen(0), True)
    assert [c[0] for c in calls] == scales and [c[1] for c in calls] == sigmas
    # x0_hat = 0, so each later input is s_i * fresh white noise: its std is s_i
    for (_, s, std) in calls:
        assert abs(std - s) < 0.02 * s
    assert out.shape == (256, 3, 32, 32) and [t.shape[-1] for t in traj] == scales
    calls.clear()
    sm.scale_wise_sample(denoise, torch.randn(2, 3, 32, 32), [32] * 4, sigmas)  # the DMD2 baseline
    assert [c[0] for c in calls] == [32] * 4


def test_scale_wise_sampler_upsamples_the_clean_estimate_not_the_noisy_input():
    # with s_K small and an identity-ish denoiser, the output must carry the first step's x0_hat upsampled
    x0 = torch.randn(1, 1, 8, 8)
    seen = []

    def denoise(x, s):
        seen.append(x)
        return sm.upsample(x0, x.shape[-1])

    sm.scale_wise_sample(denoise, torch.randn(1, 1, 8, 8), [8, 16], [1.0, 0.5], gen(1))
    eps = (seen[1] - 0.5 * sm.upsample(x0, 16)) / 0.5  # what was added must be white noise at 16 px
    assert abs(eps.std().item() - 1) < 0.2 and abs(eps.mean().item()) < 0.3


def test_training_inputs_follow_section_4():
    x = torch.randn(2, 3, 32, 32)
    eps = torch.randn(2, 3, 24, 24)
    x_t, target = sm.scale_wise_inputs(x, 2, [8, 16, 24, 32], [1.0, 0.9, 0.75, 0.6], eps)
    torch.testing.assert_close(target, torch.nn.functional.interpolate(x, size=24, mode="area"))
    prev = torch.nn.functional.interpolate(torch.nn.functional.interpolate(x, size=16, mode="area"),
                                           size=24, mode="bicubic")
    torch.testing.assert_close(x_t, 0.25 * prev + 0.75 * eps)


# ------------------------------------------------------------------ losses
def test_dmd_gradient_is_the_normalised_score_difference():
    x0_hat = torch.randn(3, 2, 4, 4, requires_grad=True)
    mu_real, mu_fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sm.dmd_loss(x0_hat, mu_real, mu_fake).backward()
    p_real, p_fake = x0_hat.detach() - mu_real, x0_hat.detach() - mu_fake
    g = (p_real - p_fake) / p_real.abs().mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(x0_hat.grad, g / x0_hat.numel())
    # the step -grad moves x0_hat towards the real estimate and away from the fake one
    assert ((-x0_hat.grad) * (mu_real - mu_fake)).sum() > 0


def test_dmd_with_exact_scores_drives_a_ring_gain_generator_to_the_data():
    """The smallest case that must work: a generator with one gain per frequency ring on the toy
    world's texture (ToyTeacher.ring_gain_sample). Its law is the toy world with spectrum gain^2 P,
    so its exact fake score is known; with the exact real score, dmd_loss alone must bring every
    gain from [0.5, 1.35] to 1."""
    toy = ToyTeacher(res=16, channels=1)
    g = gen(0)
    log_gain = (torch.rand(int(toy.rings().max()) + 1, generator=g, dtype=torch.float64) - 0.7)
    log_gain.requires_grad_(True)
    opt = torch.optim.Adam([log_gain], lr=0.03)
    for _ in range(120):
        fake_world = toy.with_spectrum(log_gain.detach().exp()[toy.rings()] ** 2 * toy.P)
        x, _ = toy.ring_gain_sample(log_gain, 64, g)
        s = 0.02 + 0.78 * torch.rand(64, generator=g, dtype=torch.float64)  # SwD's DMD range
        x_s = sm.noised(x.detach(), s, torch.randn(x.shape, generator=g, dtype=torch.float64))
        loss = sm.dmd_loss(x, toy.denoise(x_s, s), fake_world.denoise(x_s, s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (log_gain.exp() - 1).abs().max() < 0.01, log_gain.exp()


def test_patch_mmd_zero_for_identical_and_symmetric():
    a, b = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    assert sm.patch_mmd(a, a, "linear").abs() < 1e-6
    # the official RBF estimator keeps the cross diagonal, so identical sets give 2 (S - N^2) / (N^2 (N - 1)) <= 0
    gram = torch.exp(-torch.cdist(a, a) ** 2 / 8).sum((1, 2))
    torch.testing.assert_close(sm.patch_mmd(a, a, "rbf", bandwidth=2.0), (2 * (gram - 49) / (49 * 6)).mean())
    for kernel in ("linear", "rbf"):
        torch.testing.assert_close(sm.patch_mmd(a, b, kernel, bandwidth=2.0), sm.patch_mmd(b, a, kernel, bandwidth=2.0))
        assert sm.patch_mmd(a, b + 3, kernel, bandwidth=2.0) > sm.patch_mmd(a, b, kernel, bandwidth=2.0)


def test_linear_patch_mmd_is_the_mean_embedding_mmd():
    # biased MMD^2 with k(a, b) = a.b, from the full Gram matrices, equals |mean(a) - mean(b)|^2; the pseudo-
    # Huber form sqrt(d^2 + c^2) - c is ~ d^2 / 2c for large c, so with c = 1e3 it must match that MMD^2 / (2cD)
    a, b = torch.randn(3, 9, 4, dtype=torch.float64), torch.randn(3, 9, 4, dtype=torch.float64)
    gram = lambda u, v: u @ v.transpose(1, 2)
    mmd2 = gram(a, a).mean((1, 2)) + gram(b, b).mean((1, 2)) - 2 * gram(a, b).mean((1, 2))  # (B,)
    c, D = 1e3, a.shape[-1]
    torch.testing.assert_close(sm.patch_mmd(a, b, "linear", c=c), (mmd2 / (2 * c * D)).mean(), rtol=1e-5, atol=0)
    # per image differs from batch-pooled when images differ
    assert not torch.isclose(sm.patch_mmd(a, b), sm.patch_mmd(a, b, pooled=True))


def test_mmd_fine_scales_the_finest_octave_in_the_patch_loss():
    """lowpass keeps every Fourier component below the cutoff and removes the rest. With
    --mmd_fine 0 a target that differs from x0_hat only in the finest octave (radius >= res/4)
    gives patch loss 0, and the patch loss's gradient on x0_hat has no power there; with 1 (the
    official loss) the same pair reads > 0 and the gradient has; with 0.5 the gradient's power
    there is a quarter of the official one's within 15% (the pseudo-Huber is ~ |d| for feature
    gaps d >> c, so the force scales with the derivative through the scaled pair: ~ a)."""
    x = torch.randn(4, 3, 32, 32, generator=gen(0))
    k = torch.fft.fftfreq(32) * 32
    fine = (k[:, None] ** 2 + k[None] ** 2).sqrt() >= 8  # (32, 32)
    low = torch.fft.fft2(sm.lowpass(x, 8))
    torch.testing.assert_close(low[..., ~fine], torch.fft.fft2(x)[..., ~fine], rtol=0, atol=1e-4)
    assert low[..., fine].abs().max() < 1e-4
    c = sm.make_config(["--preset", "smoke", "--teacher", "toy", "--mmd_fine", "0"])
    torch.manual_seed(0)
    real = sm.load_real_score(c, torch.device("cpu"))
    student = sm.Student.start(c, torch.device("cpu"), sm.DiT.from_config(c))
    g = gen(1)
    x0 = sm.lowpass(torch.randn(8, 3, 32, 32, generator=g), 8).requires_grad_()
    target = x0.detach() + (x - sm.lowpass(x, 8)).repeat(2, 1, 1, 1)  # + texture of the finest octave
    y, s = torch.zeros(8, dtype=torch.long), torch.rand(8, generator=g) * 0.5 + 0.05
    eps_d, eps_m = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    mmd = lambda c, t: sm.generator_losses(x0, t, y, real, student.fake, student.head, s, eps_d,
                                           s, eps_m, c)["mmd"]
    assert mmd(c, target) < 1e-9 and mmd(dataclasses.replace(c, mmd_fine=1.0), target) > 1e-4
    other = torch.randn(x0.shape, generator=g)
    power = {}  # the gradient's power in the finest octave
    for a in (0.0, 0.5, 1.0):
        grad, = torch.autograd.grad(mmd(dataclasses.replace(c, mmd_fine=a), other), x0)
        power[a] = (torch.fft.fft2(grad).abs() ** 2)[..., fine].sum().item()
    assert power[0.0] < 1e-8 * power[1.0] and power[1.0] > 0
    assert abs(power[0.5] / power[1.0] - 0.25) < 0.15 * 0.25, power


def test_rbf_patch_mmd_matches_the_official_formula_by_direct_loops():
    # the official estimator: within-set pairs p != q over N(N-1), cross pairs all N^2 over N^2
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64) + 0.5
    sigma, n = 1.5, 5
    k = lambda u, v: torch.exp(-((u - v) ** 2).sum() / (2 * sigma ** 2))
    per_image = []
    for i in range(2):
        xx = sum(k(a[i, p], a[i, q]) for p in range(n) for q in range(n) if p != q) / (n * (n - 1))
        yy = sum(k(b[i, p], b[i, q]) for p in range(n) for q in range(n) if p != q) / (n * (n - 1))
        xy = sum(k(a[i, p], b[i, q]) for p in range(n) for q in range(n)) / (n * n)
        per_image.append(xx + yy - 2 * xy)
    torch.testing.assert_close(sm.patch_mmd(a, b, "rbf", bandwidth=sigma), torch.stack(per_image).mean())


def test_rbf_median_heuristic_gives_a_positive_bandwidth_that_is_the_median_distance():
    torch.manual_seed(1)
    a, b = torch.randn(2, 6, 4, dtype=torch.float64) * 7, torch.randn(2, 6, 4, dtype=torch.float64) * 7 + 1
    d = torch.cat([torch.cdist(a, a), torch.cdist(b, b), torch.cdist(a, b)], -1)
    sigma = d.median()
    assert sigma > 0
    # sigma <= 0 selects the heuristic: the same value as passing the median distance itself
    torch.testing.assert_close(sm.patch_mmd(a, b, "rbf", bandwidth=0.0), sm.patch_mmd(a, b, "rbf", bandwidth=float(sigma)))
    # and it is not a fixed bandwidth: scaling the features leaves the loss unchanged
    torch.testing.assert_close(sm.patch_mmd(10 * a, 10 * b, "rbf"), sm.patch_mmd(a, b, "rbf"))
    # features ~10 apart: a shift of 10 is plain to the median bandwidth, nearly invisible to the official 100
    a, b = torch.randn(2, 64, 4, dtype=torch.float64) * 7, torch.randn(2, 64, 4, dtype=torch.float64) * 7
    median_gap = sm.patch_mmd(a, b + 10, "rbf") - sm.patch_mmd(a, b, "rbf")
    fixed_gap = sm.patch_mmd(a, b + 10, "rbf", bandwidth=100.0) - sm.patch_mmd(a, b, "rbf", bandwidth=100.0)
    assert median_gap > 0.2 and fixed_gap < 0.1 * median_gap


def test_gan_losses_prefer_the_right_logits():
    hi, lo = torch.full((4,), 5.0), torch.full((4,), -5.0)
    assert sm.gan_discriminator_loss(hi, lo) < 0.02 < sm.gan_discriminator_loss(lo, hi)
    assert sm.gan_generator_loss(hi) < 0.01 < sm.gan_generator_loss(lo)


def test_fake_loss_weights_turn_the_x0_error_into_the_losses_they_name():
    # x_s = (1-s) x0 + s eps: an x0 error e is an eps error -(1-s)/s e and a velocity error -e/s
    g = gen(5)
    x0, eps, e = torch.randn(3, 3, 2, 8, 8, generator=g, dtype=torch.float64)  # batch 3
    s = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64)
    x_s = sm.noised(x0, s, eps)
    x0_hat = x0 + e
    eps_hat = (x_s - (1 - s)[:, None, None, None] * x0_hat) / s[:, None, None, None]
    v_hat = eps_hat - x0_hat  # the same prediction as a velocity, v = eps - x0
    per = lambda a, b: (a - b).pow(2).mean((1, 2, 3))  # noqa: E731
    err = per(x0_hat, x0)
    torch.testing.assert_close(sm.fake_loss_weight(s, "eps") * err, per(eps_hat, eps))
    torch.testing.assert_close(sm.fake_loss_weight(s, "v") * err, per(v_hat, eps - x0))
    torch.testing.assert_close(sm.fake_loss_weight(s, "x0") * err, err)
    sigma = s / (1 - s)  # EDM: lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 on the x0 error
    torch.testing.assert_close(sm.fake_loss_weight(s, "edm"), sigma ** -2 + 4)


def test_the_posterior_mean_chain_is_the_scale_wise_sampler_with_the_exact_denoiser():
    # two implementations, one in each file, of SwD's sampler with E[x0|x_t] as the generator
    t = ToyTeacher()
    y = torch.arange(64) % 4
    scales, levels = [8, 16, 24, 32], [1.0, 0.75, 0.5, 0.25]
    mine = t.posterior_mean_chain(scales, levels, y, gen(3))
    g = gen(3)
    noise = torch.randn(64, 3, 8, 8, generator=g)
    _, theirs = sm.scale_wise_sample(lambda x, s: t.denoise(x.double(), s, y).float(), noise,
                                     scales, levels, g, return_trajectory=True)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_backward_simulation_feeds_step_i_with_the_generators_own_earlier_steps():
    c = sm.make_config(["--preset", "smoke", "--inputs", "backward", "--levels", "1,0.75,0.5,0.25"])
    net = sm.DiT.from_config(c).eval()
    torch.nn.init.normal_(net.out.weight, std=0.05)  # a generator that is not the identity
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 4
    torch.manual_seed(1)
    x_t, target = sm.generator_inputs(net, x, y, 2, c)
    torch.manual_seed(1)  # the same draws, by hand: two generator steps, upsample, re-noise at s_3
    noise = torch.randn(6, 3, 8, 8)
    x0 = sm.scale_wise_sample(lambda z, s: sm.to_x0(z, s, net(z, s, y)), noise, [8, 16], [1.0, 0.75])
    torch.testing.assert_close(x_t, sm.noised(sm.upsample(x0, 24), 0.5, torch.randn(6, 3, 24, 24)))
    torch.testing.assert_close(target, sm.downsample(x, 24))
    assert sm.generator_inputs(net, x, y, 0, c)[0].std() > 0.9  # step 1: pure noise


# ------------------------------------------------------------------ end to end
def test_smoke_distillation_end_to_end_with_resume_and_sampling(tmp_path):
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out])
    ck = torch.load(os.path.join(out, "student.pt"), weights_only=False)
    assert ck["kind"] == "student" and ck["step"] == 2 and {"gen", "fake", "head", "opt_gen", "opt_fake"} <= set(ck)
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--resume", "true", "--distill_steps", "3"])
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"distill"' in l]
    assert [r["step"] for r in rows] == [0, 1, 2] and {"dmd", "gan", "mmd", "fake", "fake_first", "disc"} <= set(rows[0])
    sm.main(["--preset", "smoke", "--stage", "sample", "--out_dir", out])
    assert os.path.getsize(os.path.join(out, "samples_student.png")) > 100
    assert os.path.getsize(os.path.join(out, "student_samples.png")) > 100  # one column per step


def test_train_first_false_cycles_over_steps_2_to_k_and_a_single_step_is_always_trained(tmp_path):
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--train_first", "false",
             "--distill_steps", "4"])
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"distill"' in l]
    assert [r["res"] for r in rows] == [16, 24, 32, 16]
    one = sm.make_config(["--scales", "32", "--levels", "1", "--train_first", "false"])
    assert sm.trained_steps(one) == [0] and sm.trained_steps(sm.Config(train_first=True)) == [0, 1, 2, 3]


def test_exact_teacher_distillation_improves_the_exact_fidelity(tmp_path):
    """With the exact toy denoiser as the real score, a short SwD run beats its own start, a DiT
    regressed onto the exact velocity that distill trains first (un-preconditioned, 150 steps)."""
    args = ["--preset", "smoke", "--out_dir", str(tmp_path), "--teacher", "toy", "--res", "16", "--sigma_data", "0",
            "--scales", "8,16", "--levels", "1.0,0.6", "--hidden", "64", "--heads", "2", "--depth", "2",
            "--teacher_steps", "150", "--batch", "64", "--lr", "2e-3", "--warmup", "10",
            "--distill_steps", "60", "--distill_batch", "32", "--fake_updates", "2", "--distill_lr", "3e-4",
            "--log_every", "1000"]
    c = sm.make_config(args + ["--stage", "distill"])
    torch.manual_seed(0)
    student = sm.distill(c, torch.device("cpu"))
    start = sm.start_network(c, torch.device("cpu"), None)  # now in out_dir: teacher.pt
    assert sm.load_checkpoint(str(tmp_path / "teacher.pt"), "teacher")["config"]["teacher_target"] == "exact"
    toy = ToyTeacher(res=16)
    y = torch.arange(500) % 4
    before = toy.evaluate(sm.student_sampler(start, c, y, gen(0)))
    after = toy.evaluate(sm.student_sampler(student.eval(), c, y, gen(0)))
    assert after["fd"] < 0.8 * before["fd"], (before, after)


def test_eval_every_writes_exact_rows_for_teacher_and_student(tmp_path):
    out = str(tmp_path)
    common = ["--preset", "smoke", "--out_dir", out, "--eval_every", "3", "--eval_every_n", "40",
              "--eval_teacher", "true"]
    sm.main(common + ["--stage", "teacher"])  # 6 steps: rows at 0, 3 and the end
    sm.main(common + ["--stage", "distill", "--distill_steps", "4"])  # rows at 0, 3 and the end
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert [(r["of"], r["step"]) for r in evals] == [("teacher", 0), ("teacher", 3), ("teacher", 6),
                                                     ("student", 0), ("student", 3), ("student", 4)]
    floor = ToyTeacher(res=32).noise_floor(40, seed=7)["fd"]  # the matching floor: same n, an exact draw
    for r in evals:  # fd_parts at each run's last row only
        assert {"fd", "mode_kl", "meter", "seconds", "floor", "n"} <= set(r) and r["n"] == 40
        assert ("parts" in r) == (r["step"] in (6, 4))
        assert r["fd"] > r["floor"] == floor  # an untrained smoke model is worse than exact samples
    assert list(evals[0]["meter"]) == ["32"] and list(evals[-1]["meter"]) == ["8", "16", "24", "32"]
    assert [len(v) for v in evals[-1]["meter"].values()] == [2, 3, 4, 4]  # octave bands per scale
    assert [len(v) for v in evals[-1]["proto"].values()] == [3, 4, 5, 5]  # and DC, per scale
    assert evals[1]["seconds"] >= evals[0]["seconds"]
    assert os.path.exists(sm.plot_learning_curves(out, os.path.join(out, "curves.png")))


def test_learning_curve_on_a_dataset_puts_its_images_at_the_floor_and_reads_a_blur(monkeypatch):
    """--eval_every beyond the toy world: pixel FD against dataset images drawn once, and each
    scale's bands against the data's. Fresh dataset images read the floor and 0 dB at every scale;
    the same images blurred read above the floor and well below 0 dB in the finest band."""
    x, y = ToyTeacher(res=16).sample(3000, generator=gen(0))
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # a dataset on disk, as uint8
    loads = []
    monkeypatch.setattr(sm, "load_dataset", lambda c: loads.append(1) or (images, y))
    c = sm.Config(**{**sm.PRESETS["smoke"], "data": "fmnist", "res": 16, "scales": [8, 16],
                     "eval_every": 1, "eval_every_n": 400})
    rows, data = [], sm.Data(c, torch.device("cpu"))
    log = type("Log", (), {"write": lambda self, **row: rows.append(row)})()
    curve = sm.LearningCurve(c, log, "student", data)  # the training run's Data: no second load
    assert len(loads) == 1 and curve.floor == sm.LearningCurve(c, log, "student").floor

    def fresh(labels, g):
        x = data.batch(len(labels), g)[0]
        return [sm.downsample(x, 8), x]

    def blurred(labels, g):
        return [sm.upsample(sm.downsample(x, 8), 16) if x.shape[-1] == 16 else x
                for x in fresh(labels, g)]

    curve(0, fresh)
    curve(1, blurred)
    assert rows[0]["floor"] > 0 and rows[0]["fd"] < 1.5 * rows[0]["floor"]
    assert all(abs(db) < 0.3 for bands in rows[0]["meter"].values() for db in bands)
    assert rows[1]["fd"] > 1.5 * rows[0]["floor"] and rows[1]["meter"][16][-1] < -3
    assert list(rows[1]["meter"]) == [8, 16] and "mode_kl" not in rows[1]


def test_distillation_curves_read_the_dataset_never_the_teacher_bank(tmp_path, monkeypatch):
    """Off the toy world the teacher's and the student's curves reuse the training Data, the
    dataset; under --real teacher that Data is the teacher bank, so the curve loads the dataset,
    or shares the one the regression's first-step means were drawn from (loaded once)."""
    x, y = ToyTeacher(res=16).sample(64, generator=gen(0))
    loads = []
    monkeypatch.setattr(sm, "load_dataset", lambda c: loads.append(1) or (((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), y))
    seen, curve = [], sm.LearningCurve
    monkeypatch.setattr(sm, "LearningCurve", lambda c, log, of, data=None: seen.append(data) or curve(c, log, of, data))
    args = ["--preset", "smoke", "--data", "fmnist", "--res", "16", "--scales", "8,16", "--levels", "1,0.5"]
    sm.main(args + ["--stage", "teacher", "--out_dir", str(tmp_path / "a")])
    sm.main(args + ["--stage", "distill", "--out_dir", str(tmp_path / "a")])
    sm.main(args + ["--stage", "distill", "--out_dir", str(tmp_path / "b"), "--real", "teacher",
                    "--teacher", str(tmp_path / "a" / "teacher.pt")])
    assert [type(d).__name__ for d in seen] == ["Data", "Data", "NoneType"]
    assert torch.equal(seen[1].x, seen[0].x) and len(seen[1].x) == 64  # the dataset, not a bank
    loads.clear()
    sm.main(args + ["--stage", "distill", "--out_dir", str(tmp_path / "c"), "--real", "teacher",
                    "--teacher", str(tmp_path / "a" / "teacher.pt"), "--reg_weight", "1",
                    "--train_first", "false"])
    assert type(seen[3]).__name__ == "Data" and torch.equal(seen[3].x, seen[0].x) and loads == [1]


def test_fake_error_ranks_the_bayes_denoiser_of_gs_samples_above_the_real_score():
    """fake_error on a generator with too much texture (field x1.5 in amplitude), the exact real
    score of the data: G's own exact denoiser as the fake reads excess < 0 at every level (Bayes
    on G's samples), halfway to it 3/4 of that, the real score 0; push is dmd_loss's g's RMS."""
    toy = ToyTeacher(res=16)
    world_g = toy.with_spectrum(toy.P * 1.5 ** 2)
    x0_g, y = world_g.sample(64, generator=gen(0))
    c = sm.make_config(["--fake", "copy"])
    real = lambda x, s, y: toy.velocity(x.double(), s, y).float()
    bayes = sm.fake_error(SimpleNamespace(fake=lambda x, s, y, skip: world_g.velocity(x.double(), s, y).float()),
                          real, x0_g, y, c, levels=(0.05, 0.2, 0.5), toy=toy)
    assert max(bayes["excess"]) < -0.01, bayes
    assert max(max(row["random"]) for row in bayes["texture_cos"]) < 0, bayes  # lowers loud texture
    # halfway from the real score to G's: error e = -d/2, so excess = (|e|^2 - |d|^2) / mse_real
    # is 3/4 of the Bayes denoiser's -|d|^2 / mse_real
    mid = lambda x, s, y, skip: (real(x, s, y) + world_g.velocity(x.double(), s, y).float()) / 2
    half = sm.fake_error(SimpleNamespace(fake=mid), real, x0_g, y, c, levels=(0.05, 0.2, 0.5))
    for a, b, pa, pb in zip(half["excess"], bayes["excess"], half["push"], bayes["push"]):
        assert abs(a / b - 0.75) < 0.05 and abs(pa / pb - 0.5) < 1e-3, (half, bayes)
    same = sm.fake_error(SimpleNamespace(fake=lambda x, s, y, skip: real(x, s, y)), real, x0_g, y, c,
                         toy=toy)
    assert same["excess"] == [0.0] * 6 and same["push"] == [0.0] * 6
    zero = [0.0] * len(octave_bands(16))
    assert same["texture_cos"] == [dict(random=zero, systematic=zero)] * 6
    x_s = sm.noised(x0_g, 0.05, torch.randn(x0_g.shape, generator=gen(c.seed + 17)))  # its first level
    x0_hat = x0_g.clone().requires_grad_(True)
    sm.dmd_loss(x0_hat, toy.denoise(x_s.double(), 0.05, y).float(), world_g.denoise(x_s.double(), 0.05, y).float()).backward()
    g = x0_hat.grad * x0_g.numel()  # d loss / d x0_hat = g / numel
    assert abs(g.pow(2).mean().sqrt().item() - bayes["push"][0]) < 1e-3 and bayes["push"][0] > 0.05


def test_fitted_world_recovers_ring_gains_and_is_the_fake_that_fake_error_compares_against():
    """toy.fitted on ring_gain_sample draws (texture x0.7 in amplitude from ring 4 up) recovers
    each ring's power gain within 10% and reads 0 dB on the blur meter; fake_error with that
    world's exact score as the fake network reads the same rate per band as its "fitted" move,
    and that move raises the damped bands (rate > 0) and leaves the coarsest alone."""
    toy = ToyTeacher(res=16)
    rings = toy.rings()
    log_gain = torch.where(torch.arange(int(rings.max()) + 1) >= 4, math.log(0.7), 0.0).double()
    x0_g, y = toy.ring_gain_sample(log_gain, 512, generator=gen(0))
    fit = toy.fitted(x0_g)
    for q in range(1, int(rings.max()) + 1):
        ratio = fit.P[rings == q].mean() / toy.P[rings == q].mean()
        assert abs(ratio / log_gain[q].exp() ** 2 - 1) < 0.1, (q, ratio)
    assert max(abs(v) for v in fit.blur_meter(x0_g)) < 0.1
    c = sm.make_config(["--fake", "copy"])
    real = lambda x, s, y: toy.velocity(x.double(), s, y).float()
    fake = lambda x, s, y, skip: fit.velocity(x.double(), s, y).float()
    out = sm.fake_error(SimpleNamespace(fake=fake), real, x0_g.float(), y, c, levels=(0.05, 0.2),
                        toy=toy)
    for row in out["rate"]:
        assert all(abs(a - b) <= 2e-3 for a, b in zip(row["learned"], row["fitted"])), row
        assert min(row["fitted"][2:]) > 0.01 and abs(row["fitted"][0]) < 0.01, row


def test_fake_fitted_is_dmd_against_the_fitted_world_at_full_resolution():
    """--fake fitted (toy world): at full resolution DMD's fake x0 estimate is toy.fitted(G's
    batch).denoise, so generator_losses' dmd equals dmd_loss computed from the two exact worlds;
    on the same batch a fresh --fake residual reads 0 (its fake is the real score), the fitted
    fake of texture damped x0.7 does not; below full resolution the fitted fake is the residual."""
    c = sm.make_config(["--preset", "smoke", "--teacher", "toy", "--fake", "fitted"])
    toy, dev = sm.toy_world(c), torch.device("cpu")
    torch.manual_seed(0)
    real, student = sm.load_real_score(c, dev), sm.Student.start(c, dev, sm.DiT.from_config(c))
    log_gain = torch.where(torch.arange(int(toy.rings().max()) + 1) >= 4, math.log(0.7), 0.0)
    x0, y = toy.ring_gain_sample(log_gain.double(), 32, generator=gen(1))
    x0, g = x0.float(), gen(2)
    s_d, s_m = torch.rand(32, generator=g) * 0.3 + 0.02, torch.rand(32, generator=g)
    eps_d, eps_m = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    r = lambda e, x: e[..., :x.shape[-2], :x.shape[-1]]  # noise of x's size
    dmd = lambda c, x: sm.generator_losses(x, x, y, real, student.fake, student.head, s_d,
                                           r(eps_d, x), s_m, r(eps_m, x), c)["dmd"]
    x_d = sm.noised(x0, s_d, eps_d).double()
    mu_real = toy.denoise(x_d, s_d, y).float()
    expect = sm.dmd_loss(x0, mu_real, toy.fitted(x0).denoise(x_d, s_d, y).float())
    torch.testing.assert_close(dmd(c, x0), expect, rtol=1e-3, atol=0)
    assert expect > 1e-3 and dmd(dataclasses.replace(c, fake="residual"), x0) == 0
    x16 = sm.downsample(x0, 16)
    assert dmd(c, x16) == dmd(dataclasses.replace(c, fake="residual"), x16) == 0


def test_loss_forces_read_zero_where_a_term_has_no_gradient_and_add_with_its_weight():
    """loss_forces at a fresh student (a smoke DiT on the toy world): the residual fake network
    starts as the real score, so DMD's force is exactly 0 in every band; the patch loss against
    G's own samples as targets is at its minimum (0 at every level); against other targets it
    is not, and each term's rate is linear in its weight."""
    c = sm.make_config(["--preset", "smoke", "--gan_weight", "0.1", "--teacher", "toy"])
    toy, dev = sm.toy_world(c), torch.device("cpu")
    torch.manual_seed(0)
    real = sm.load_real_score(c, dev)
    student = sm.Student.start(c, dev, sm.DiT.from_config(c))
    x0_g, y = toy.sample(32, generator=gen(1))
    x0_g, targets = x0_g.float(), toy.sample(32, y=y, generator=gen(2))[0].float()
    own = sm.loss_forces(student, real, x0_g, x0_g, y, c, toy)
    zero = [0.0] * len(octave_bands(c.res))
    assert own["dmd"] == zero and all(own[k] == zero for k in own if k.startswith("mmd")), own
    other = sm.loss_forces(student, real, x0_g, targets, y, c, toy)
    assert max(abs(v) for v in other["mmd@0.02"]) > 0 and max(abs(v) for v in other["gan"]) > 0
    c2 = dataclasses.replace(c, gan_weight=0.2, mmd_weight=2 * c.mmd_weight)
    twice = sm.loss_forces(student, real, x0_g, targets, y, c2, toy)
    for k in ("gan", "mmd", "mmd@0.2"):
        assert all(abs(b - 2 * a) <= 1e-2 * abs(a) for a, b in zip(other[k], twice[k])), (other, twice)


def test_fake_probe_starts_at_zero_and_leaves_training_as_it_was(tmp_path):
    """--probe_every 1: a fake_probe.jsonl row per step, at step 0 exactly 0 (the residual fake
    network starts as the real score), and the same weights as a run without it, bit for bit."""
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", str(tmp_path / "a")])
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "teacher.pt", tmp_path / "b" / "teacher.pt")
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", str(tmp_path / "a")])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", str(tmp_path / "b"), "--probe_every", "1"])
    rows = [json.loads(l) for l in open(tmp_path / "b" / "fake_probe.jsonl")]
    assert [(r["step"], r["res"]) for r in rows] == [(0, 8), (1, 16)]
    assert rows[0]["before"]["excess"] == [0.0] * 6 and rows[0]["before"]["push"] == [0.0] * 6
    assert rows[0]["before"]["texture_cos"] == [dict(random=[0.0] * 2, systematic=[0.0] * 2)] * 6
    assert min(rows[0]["use"]["push"]) > 0  # five fake updates moved it
    assert set(rows[1]["forces"]) == {"dmd", "gan", "mmd", "mmd@0.02", "mmd@0.05", "mmd@0.1",
                                      "mmd@0.2", "mmd@0.4"}
    a, b = (torch.load(tmp_path / d / "student.pt", weights_only=True) for d in "ab")
    for key in ("gen", "fake", "head"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_accumulation_equals_the_whole_batch_in_one_go(tmp_path):
    """--accum 2: each optimiser step's batch in two micro-batches, the same seeds: the teacher and
    both halves of distillation (the regression term too) end where one pass over the whole batch
    ends (fp32 rounding)."""
    runs = {}
    for accum in (1, 2):
        out = str(tmp_path / f"accum{accum}")
        for stage in ("teacher", "distill"):
            sm.main(["--preset", "smoke", "--stage", stage, "--out_dir", out, "--accum", str(accum),
                     "--distill_steps", "4", "--reg_weight", "1", "--reg_n", "8"])
        runs[accum] = [torch.load(os.path.join(out, f"{k}.pt"), weights_only=True) for k in ("teacher", "student")]
    for (a, b), keys in zip(zip(runs[1], runs[2]), (["model", "ema"], ["gen", "fake", "head"])):
        for key in keys:
            for name in a[key]:
                assert (a[key][name] - b[key][name]).abs().max() < 1e-6, (key, name)
    moved = max((runs[1][1]["gen"][k] - runs[1][0]["ema"][k]).abs().max() for k in runs[1][1]["gen"])
    assert moved > 1e-4  # the steps did change the generator


def test_real_teacher_trains_on_a_cached_bank_of_teacher_samples(tmp_path):
    """--real teacher: the GAN, patch loss and generator inputs use the teacher's own samples (SwD's
    official data), drawn once into teacher_bank.pt and read back on the next run."""
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--real", "teacher"])
    bank = torch.load(os.path.join(out, "teacher_bank.pt"), weights_only=True)
    assert bank["x"].shape == (16, 3, 32, 32) and bank["y"].tolist() == [k % 4 for k in range(16)]
    c = sm.make_config(["--preset", "smoke", "--out_dir", out])
    real = sm.load_real_score(c, torch.device("cpu"))
    torch.testing.assert_close(bank["x"][:4], sm.teacher_sampler(real, c, bank["y"][:4], generator=sm.seeded(11))
                               .clamp(-1, 1))
    before = os.path.getmtime(os.path.join(out, "teacher_bank.pt"))
    data = sm.teacher_bank(real, c, torch.device("cpu"))  # cached: not drawn again
    assert os.path.getmtime(os.path.join(out, "teacher_bank.pt")) == before and len(data.y) == 16
    x, y = data.batch(8, sm.seeded(0))
    assert any(torch.equal(x[0], b) for b in bank["x"])  # batches are bank images


def test_regression_pairs_are_the_exact_ode_solutions_and_train_step_1_only(tmp_path):
    """--reg_weight (DMD1's regression loss): ode_pairs holds noise z at the first scale and the
    real score's Euler solution from z, here checked against the toy world's own float64 Euler;
    the loss enters G's update at step 1 alone, beside unchanged DMD, GAN and patch terms."""
    c = sm.make_config(["--preset", "smoke", "--out_dir", str(tmp_path), "--teacher", "toy",
                        "--scales", "16,32", "--levels", "1,0.5", "--reg_n", "8",
                        "--reg_weight", "1", "--sample_steps", "4"])
    toy, cpu = sm.toy_world(c), torch.device("cpu")
    z, y, x_ode = sm.ode_pairs(sm.load_real_score(c, cpu), c, cpu)
    x, s = z.double(), torch.linspace(1, 0, 5, dtype=torch.float64)
    for i in range(4):
        x = x + (s[i + 1] - s[i]) * toy.velocity(x, s[i], y)
    assert z.shape == (8, 3, 16, 16) and y.tolist() == [k % 4 for k in range(8)]
    torch.testing.assert_close(x_ode, x.float(), atol=1e-5, rtol=1e-5)
    data, real, init = sm.Data(c, cpu), sm.load_real_score(c, cpu), sm.DiT.from_config(c)
    runs = []
    for pairs in (None, (z, y, x_ode)):
        torch.manual_seed(0)
        st = sm.Student.start(c, cpu, init)
        terms = [sm.generator_step(st, real, data, c, i, sm.Guard(), pairs=pairs) for i in (0, 1)]
        runs.append((terms, torch.cat([p.detach().flatten() for p in st.gen.parameters()])))
    (plain, w_plain), (with_reg, w_reg) = runs
    assert "reg" in with_reg[0] and "reg" not in with_reg[1] and "reg" not in plain[0]
    for k in ("dmd", "gan", "mmd"):  # the same draws: only the regression term differs
        torch.testing.assert_close(plain[0][k], with_reg[0][k])
    assert (w_plain - w_reg).abs().max() > 1e-6  # and it moved G


def test_first_step_means_are_the_exact_posterior_mean_at_pure_noise_and_the_hold_adds_its_gradient(monkeypatch):
    """With step 1 untrained, first_step_means is where --reg_weight holds it: at s = 1 the exact
    x0 estimate is the class mean, checked against the toy world's own posterior mean (with CFG,
    the guided one). The hold adds to G's gradient exactly --reg_weight x the gradient of the MSE
    of G's step 1 against it, on noise drawn after the other terms' (DMD, GAN, patch unchanged)."""
    c = sm.make_config(["--preset", "smoke", "--teacher", "toy", "--res", "16", "--scales", "8,16",
                        "--levels", "1,0.5", "--train_first", "false", "--reg_weight", "3"])
    cpu, toy = torch.device("cpu"), sm.toy_world(c)
    data, y = sm.Data(c, cpu), torch.arange(4)
    exact = toy.denoise(torch.randn(4, 3, 8, 8, dtype=torch.float64), 1.0, y).float()
    uncond = toy.denoise(torch.randn(4, 3, 8, 8, dtype=torch.float64), 1.0).float()
    for w in (1.0, 2.0):
        means = sm.first_step_means(data, dataclasses.replace(c, cfg=w), 8)
        assert (means - exact - (w - 1) * (exact - uncond)).pow(2).mean().sqrt() < 0.02 * w
    means, real, init = sm.first_step_means(data, c, 8), sm.load_real_score(c, cpu), sm.DiT.from_config(c)
    init.out.weight.data.normal_(0, 0.02)  # a network whose output moves with every weight
    monkeypatch.setattr(sm, "update", lambda opt, params, *a, **terms: (
        dict(terms, grads=[p.grad.clone() for p in params]), None))
    runs = []
    for m in (None, means):
        torch.manual_seed(0)
        st = sm.Student.start(c, cpu, init)
        runs.append(sm.generator_step(st, real, data, c, 1, sm.Guard(), means=m))
    plain, held = runs
    torch.manual_seed(0)
    st = sm.Student.start(c, cpu, init)  # the run's draws, replayed: its GAN head's, then the batch
    batch = sm.training_batch(st.gen, data, c, 1, [c.dmd_levels, c.mmd_levels], first_noise=True)
    z, yz = batch[7], batch[2]
    hold = (sm.to_x0(z, 1.0, st.gen(z, 1.0, yz)) - means[yz]).pow(2).mean()
    by_hand = torch.autograd.grad(3 * hold, list(st.gen.parameters()), allow_unused=True)
    torch.testing.assert_close(held["hold"], hold.detach())
    for a, b, g in zip(plain["grads"], held["grads"], by_hand):
        torch.testing.assert_close(b - a, torch.zeros_like(a) if g is None else g, atol=1e-6, rtol=1e-4)
    assert "hold" not in plain and max(g.abs().max() for g in by_hand if g is not None) > 1e-4
    for k in ("dmd", "gan", "mmd"):  # the same draws: the hold's noise comes after theirs
        torch.testing.assert_close(plain[k], held[k])


def test_past_an_untrained_step_1_the_regression_pairs_start_where_the_sampler_feeds_step_2(tmp_path):
    """--reg_weight with --train_first false: ode_pairs' inputs are step 1's means up-sampled and
    re-noised at s_2, as scale_wise_sample feeds step 2 when step 1 returns them, and their targets
    the real score's Euler solution from s_2, checked against the toy world's own float64 Euler;
    the step-2 update carries both the regression and the hold."""
    c = sm.make_config(["--preset", "smoke", "--out_dir", str(tmp_path), "--teacher", "toy", "--res", "16",
                        "--scales", "8,16", "--levels", "1,0.5", "--train_first", "false", "--reg_n", "8",
                        "--reg_weight", "1", "--sample_steps", "8"])
    cpu, toy = torch.device("cpu"), sm.toy_world(c)
    data, real = sm.Data(c, cpu), sm.load_real_score(c, cpu)
    means = sm.first_step_means(data, c, 8)
    x, y, x_ode = sm.ode_pairs(real, c, cpu, means)
    fed = []  # what the sampler feeds step 2 when step 1 returns the means, from the same noise
    sm.scale_wise_sample(lambda z, s: fed.append(z) or (means[y] if s == 1.0 else z), torch.zeros(8, 3, 8, 8),
                         [8, 16], [1.0, 0.5], sm.seeded(c.seed + 13))
    torch.testing.assert_close(x, fed[1])
    t, s = x.double(), torch.linspace(0.5, 0, 5, dtype=torch.float64)  # 8 steps over [0, 1]: 4 from 0.5
    for i in range(4):
        t = t + (s[i + 1] - s[i]) * toy.velocity(t, s[i], y)
    torch.testing.assert_close(x_ode, t.float(), atol=1e-5, rtol=1e-5)
    st = sm.Student.start(c, cpu, sm.DiT.from_config(c))
    terms = sm.generator_step(st, real, data, c, 1, sm.Guard(), pairs=(x, y, x_ode), means=means)
    assert terms["reg"] > 0 and terms["hold"] > 0


def test_distill_with_an_untrained_step_1_regresses_step_2_and_holds_step_1_at_every_later_step(tmp_path):
    """--train_first false --reg_weight 1, end to end: the first trained step (16 px) logs the
    regression and the hold, the later ones the hold alone; the pairs start at step 2's level."""
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--train_first", "false",
             "--reg_weight", "1", "--reg_n", "8", "--distill_steps", "3"])
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"distill"' in l]
    assert [(r["res"], "reg" in r, "hold" in r) for r in rows] == [(16, True, True), (24, False, True),
                                                                   (32, False, True)]
    pairs = torch.load(os.path.join(out, "ode_pairs.pt"), weights_only=True)
    assert pairs["z"].shape == (8, 3, 16, 16) and pairs["key"]["level"] == 0.9  # smoke: 1, .9, .75, .6


def test_distill_decay_cools_the_generator_lr_by_cosine_to_a_tenth_and_leaves_the_fake_lr(monkeypatch):
    """--distill_decay: k steps after the warm-up both rates share, of N - warm-up, the generator's
    lr is lr (0.1 + 0.45 (1 + cos(pi k / (N - warm-up)))); the fake network's lr only warms up.
    Off: both only warm up."""
    seen = []

    def record_rates(st, *args):  # stands in for the fake half: what each optimiser would use
        seen.append((st.opt_gen.param_groups[0]["lr"], st.opt_fake.param_groups[0]["lr"]))
        return 0.0, 0.0, 0.0

    monkeypatch.setattr(sm, "fake_score_step", record_rates)
    monkeypatch.setattr(sm, "generator_step", lambda *a: {})
    for decay in ("true", "false"):
        c = sm.make_config(["--preset", "smoke", "--distill_steps", "10", "--distill_lr", "1e-3",
                            "--fake_lr", "4e-3", "--distill_warmup", "2", "--distill_decay", decay])
        opt = lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        st = SimpleNamespace(opt_gen=opt(), opt_fake=opt())
        for k in (0, 1, 6, 9):
            sm.distill_iteration(st, None, None, c, 1, None, step=k)
    cosine = lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * (k - 2) / 8))
    warm = [(1e-3 / 2, 4e-3 / 2), (1e-3, 4e-3)]  # steps 0, 1: the warm-up of both
    want = warm + [(1e-3 * cosine(k), 4e-3) for k in (6, 9)] + warm + [(1e-3, 4e-3)] * 2
    for (g, f), (wg, wf) in zip(seen, want, strict=True):
        assert math.isclose(g, wg, rel_tol=1e-9) and math.isclose(f, wf, rel_tol=1e-9)
    assert sm.make_config([]).distill_decay and not sm.make_config(["--preset", "fmnist"]).distill_decay


def test_a_decayed_run_resumed_at_a_constant_lr_trains_at_the_flags_rate(tmp_path):
    """A checkpoint whose generator lr decayed, resumed with --distill_decay false, ends at
    --distill_lr: resuming sets the rates from the flags, not from the saved optimiser."""
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--distill_decay", "true",
             "--distill_lr", "1e-3"])

    def lr():
        return sm.load_checkpoint(os.path.join(out, "student.pt"))["opt_gen"]["param_groups"][0]["lr"]

    assert lr() < 1e-3  # decayed
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--distill_decay", "false",
             "--distill_lr", "1e-3", "--resume", "true", "--distill_steps", "3"])
    assert lr() == 1e-3
