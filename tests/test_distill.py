"""swd_mini part 2: the scale-wise sampler, the SwD losses, and distillation end to end."""
import json
import os

import torch

import swd_mini as sm
from toy_teacher import ToyTeacher


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
    # with re-noising levels s, the official weighting: the gradient that flows through x_s = (1-s) x0_hat + s eps
    s = torch.tensor([0.1, 0.5, 0.9])
    x0_hat.grad = None
    sm.dmd_loss(x0_hat, mu_real, mu_fake, s).backward()
    torch.testing.assert_close(x0_hat.grad, (1 - s).reshape(-1, 1, 1, 1) * g / x0_hat.numel())


def test_patch_mmd_zero_for_identical_and_symmetric():
    a, b = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    assert sm.patch_mmd(a, a, "linear").abs() < 1e-6
    # the official RBF estimator keeps the cross diagonal, so identical sets give 2 (S - N^2) / (N^2 (N - 1)) <= 0
    gram = torch.exp(-torch.cdist(a, a) ** 2 / 8).sum((1, 2))
    torch.testing.assert_close(sm.patch_mmd(a, a, "rbf", sigma=2.0), (2 * (gram - 49) / (49 * 6)).mean())
    for kernel in ("linear", "rbf"):
        torch.testing.assert_close(sm.patch_mmd(a, b, kernel, sigma=2.0), sm.patch_mmd(b, a, kernel, sigma=2.0))
        assert sm.patch_mmd(a, b + 3, kernel, sigma=2.0) > sm.patch_mmd(a, b, kernel, sigma=2.0)


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
    torch.testing.assert_close(sm.patch_mmd(a, b, "rbf", sigma=sigma), torch.stack(per_image).mean())


def test_rbf_median_heuristic_gives_a_positive_bandwidth_that_is_the_median_distance():
    torch.manual_seed(1)
    a, b = torch.randn(2, 6, 4, dtype=torch.float64) * 7, torch.randn(2, 6, 4, dtype=torch.float64) * 7 + 1
    d = torch.cat([torch.cdist(a, a), torch.cdist(b, b), torch.cdist(a, b)], -1)
    sigma = d.median()
    assert sigma > 0
    # sigma <= 0 selects the heuristic: the same value as passing the median distance itself
    torch.testing.assert_close(sm.patch_mmd(a, b, "rbf", sigma=0.0), sm.patch_mmd(a, b, "rbf", sigma=float(sigma)))
    # and it is not a fixed bandwidth: scaling the features leaves the loss unchanged
    torch.testing.assert_close(sm.patch_mmd(10 * a, 10 * b, "rbf"), sm.patch_mmd(a, b, "rbf"))
    # features ~10 apart: a shift of 10 is plain to the median bandwidth, nearly invisible to the official 100
    a, b = torch.randn(2, 64, 4, dtype=torch.float64) * 7, torch.randn(2, 64, 4, dtype=torch.float64) * 7
    median_gap = sm.patch_mmd(a, b + 10, "rbf") - sm.patch_mmd(a, b, "rbf")
    fixed_gap = sm.patch_mmd(a, b + 10, "rbf", sigma=100.0) - sm.patch_mmd(a, b, "rbf", sigma=100.0)
    assert median_gap > 0.2 and fixed_gap < 0.1 * median_gap


def test_gan_losses_prefer_the_right_logits():
    hi, lo = torch.full((4,), 5.0), torch.full((4,), -5.0)
    assert sm.gan_discriminator_loss(hi, lo) < 0.02 < sm.gan_discriminator_loss(lo, hi)
    assert sm.gan_generator_loss(hi) < 0.01 < sm.gan_generator_loss(lo)


# ------------------------------------------------------------------ end to end
def test_smoke_distillation_end_to_end_with_resume_and_sampling(tmp_path):
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out])
    ck = torch.load(os.path.join(out, "student.pt"), weights_only=False)
    assert ck["kind"] == "student" and ck["step"] == 2 and {"gen", "gen_ema", "fake", "head", "opt_gen", "opt_fake"} <= set(ck)
    sm.main(["--preset", "smoke", "--stage", "distill", "--out_dir", out, "--resume", "true", "--distill_steps", "3"])
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"distill"' in l]
    assert [r["step"] for r in rows] == [0, 1, 2] and {"dmd", "gan", "mmd", "fake", "disc"} <= set(rows[0])
    sm.main(["--preset", "smoke", "--stage", "sample", "--out_dir", out])
    assert os.path.getsize(os.path.join(out, "samples_student.png")) > 100
    assert os.path.getsize(os.path.join(out, "student_samples.png")) > 100  # one column per step


def test_exact_teacher_distillation_improves_the_exact_fidelity(tmp_path):
    """With the exact toy denoiser as the real score, a short SwD run beats an undistilled generator that
    starts far from the data (un-preconditioned, 150 regression steps: FD 249 at n = 500 when measured)."""
    args = ["--preset", "smoke", "--out_dir", str(tmp_path), "--teacher", "toy", "--res", "16", "--sigma_data", "0",
            "--scales", "8,16", "--sigmas", "1.0,0.6", "--hidden", "64", "--heads", "2", "--depth", "2",
            "--teacher_steps", "150", "--batch", "64", "--lr", "2e-3", "--warmup", "10",
            "--distill_steps", "60", "--distill_batch", "32", "--fake_updates", "2", "--distill_lr", "3e-4",
            "--log_every", "1000"]
    c = sm.make_config(args + ["--stage", "distill"])
    torch.manual_seed(0)
    student = sm.distill(c, torch.device("cpu"))
    init = sm.init_network_for_toy(c, torch.device("cpu"))  # cached: the generator's starting point
    toy = ToyTeacher(res=16)
    y = sm.grid_labels(500, 4, "cpu")
    before = toy.evaluate(sm.student_sampler(init, c, torch.device("cpu"), y, gen(0)))
    after = toy.evaluate(sm.student_sampler(student.eval(), c, torch.device("cpu"), y, gen(0)))
    assert after["fd"] < 0.8 * before["fd"], (before, after)


def test_eval_every_writes_exact_fd_rows_for_teacher_and_student(tmp_path):
    out = str(tmp_path)
    common = ["--preset", "smoke", "--out_dir", out, "--eval_every", "3", "--eval_every_n", "40"]
    sm.main(common + ["--stage", "teacher"])  # 6 steps: rows at 0, 3 and the end
    sm.main(common + ["--stage", "distill", "--distill_steps", "4"])  # rows at 0, 3 and the end
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert [(r["of"], r["step"]) for r in evals] == [("teacher", 0), ("teacher", 3), ("teacher", 6),
                                                     ("student", 0), ("student", 3), ("student", 4)]
    floor = ToyTeacher(res=32).noise_floor(40, seed=7)["fd"]  # the matching floor: same n, an exact draw
    for r in evals:
        assert {"fd", "mode_kl", "seconds", "floor", "n"} <= set(r) and r["n"] == 40
        assert r["fd"] > r["floor"] == floor  # an untrained smoke model is worse than exact samples
    assert evals[1]["seconds"] >= evals[0]["seconds"]
    assert os.path.exists(sm.plot_learning_curves(out, os.path.join(out, "curves.png")))


def test_residual_fake_score_starts_at_the_real_score_and_learns_only_a_correction():
    c = sm.make_config(["--preset", "smoke", "--fake_residual", "true"])
    real = sm.DiT.from_config(c).eval().requires_grad_(False)
    torch.nn.init.normal_(real.out.weight, std=0.1)  # a real score that is not just the skip term
    st = sm.make_student(c, torch.device("cpu"), real)
    x, s, y = torch.randn(3, 3, 32, 32), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    # the trainable network's own output (without the preconditioning's skip term) is the correction: 0 at first
    assert st.fake(x, s, y, skip=False).abs().max() == 0
    # so the fake score equals the real one and the DMD gradient mu_fake - mu_real is exactly 0 at the start
    torch.testing.assert_close(sm.fake_velocity(st.fake, real, x, s, y, c), real(x, s, y))
    # one step on the correction moves the fake score away from the real one by exactly that correction
    torch.nn.init.normal_(st.fake.out.weight, std=0.1)
    delta = st.fake(x, s, y, skip=False)
    torch.testing.assert_close(sm.fake_velocity(st.fake, real, x, s, y, c), real(x, s, y) + delta)
    # the official fake score (a plain copy of the teacher) also starts equal, but is the network itself
    direct_c = sm.make_config(["--preset", "smoke"])
    direct = sm.make_student(direct_c, torch.device("cpu"), real)
    assert direct_c.fake_residual is False
    torch.testing.assert_close(sm.fake_velocity(direct.fake, real, x, s, y, direct_c), real(x, s, y))
