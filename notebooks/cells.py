"""The cells of the four step-through notebooks (built by notebooks/build.py, run by tests/test_notebooks.py)."""

SPECTRAL = [
    ("md", """# 1. Spectral autoregression: from one image's spectrum to a scale-wise schedule
SwD rests on one observation (paper section 2): in `x_t = (1-s) x0 + s eps` the noise drowns high frequencies
first, so a noisy step only needs low resolution. We measure this on the toy world, where everything is known."""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ToyScore, ToyTeacher
toy = ToyTeacher()
x0, y = toy.sample(512, generator=torch.Generator().manual_seed(0))
print(x0.shape)"""),
    ("md", """## One image and its spectrum
`rapsd` averages |FFT|^2 over rings of equal frequency. Natural images fall as a power law."""),
    ("code", """f, p1 = sm.rapsd(x0[:1])
f, P = sm.rapsd(x0)
fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
ax[0].imshow((x0[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[0].set_title("one toy image"); ax[0].axis("off")
ax[1].loglog(f, p1, label="this image"); ax[1].loglog(f, P, "k", label=f"512 images, slope {sm.power_law_slope(f, P):.2f}")
ax[1].set_xlabel("cycles / pixel"); ax[1].legend()"""),
    ("md", """## Noise is flat, so it wins at high frequency
The signal contributes `(1-s)^2 P(k)`, the noise a flat `s^2`. They cross at k*(s)."""),
    ("code", """fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(f, P, "k", lw=2, label="data")
for s in (0.3, 0.6, 0.9):
    ax.loglog(f, (1 - s) ** 2 * P, label=f"signal at s={s}")
    ax.axhline(s ** 2, ls="--", lw=0.8)
    print(f"s = {s}: crossover k* = {sm.crossover(f, P, s):.3f} cycles/pixel")
ax.set_xlabel("cycles / pixel"); ax.legend(fontsize=7)"""),
    ("md", """## k*(s) falls as s rises
Everything above k*(s) is noise, so a step at level s needs a resolution whose Nyquist frequency reaches k*."""),
    ("code", """grid = torch.linspace(0.05, 0.95, 40)
plt.figure(figsize=(5, 3.5))
plt.semilogy(grid, [sm.crossover(f, P, float(s)) for s in grid], "k")
plt.xlabel("noise level s"); plt.ylabel("k*(s), cycles / pixel")"""),
    ("md", """## From the spectrum to a schedule
`auto_schedule` picks, for each step, the least noise that drowns what the previous (smaller) scale cannot hold,
by a margin. The paper's hand schedule is far more cautious on this data."""),
    ("code", """scales = [8, 16, 24, 32]
for margin in (1.0, 4.0, 16.0):
    print(f"margin {margin:5.1f}: auto sigmas", [round(v, 3) for v in sm.auto_schedule(f, P, scales, margin)])
print("paper-style hand schedule:", sm.Config().sigmas)"""),
]

TEACHER = [
    ("md", """# 2. The teacher: the exact toy world, a small DiT, and few-step Euler's collapse"""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ToyScore, ToyTeacher
toy = ToyTeacher()
torch.manual_seed(0)"""),
    ("md", """## The exact denoiser
`toy.denoise(x_t, s)` is the posterior mean E[x0 | x_t]: the best any network can do."""),
    ("code", """x0, y = toy.sample(1, generator=torch.Generator().manual_seed(3))
fig, ax = plt.subplots(2, 4, figsize=(8, 4))
for j, s in enumerate((0.2, 0.5, 0.8, 0.95)):
    x_t = (1 - s) * x0 + s * torch.randn_like(x0)
    for i, img in enumerate((x_t, toy.denoise(x_t, s))):
        ax[i, j].imshow((img[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[0, j].set_title(f"x_t, s={s}"); ax[1, j].set_title("E[x0|x_t]")"""),
    ("md", """## A small DiT, trained at every scale for a minute
Each batch is drawn at one scale (8 or 16 px here), as `--stage teacher` does. We track the denoising error
against the exact denoiser's on the same inputs."""),
    ("code", """c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1)
toy16 = ToyTeacher(res=16)
model, data = sm.DiT.from_config(c), sm.Data(c, torch.device("cpu"))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
for step in range(300):
    x, yb = data.batch(64)
    x0b = sm.downsample(x, c.scales[step % 2])
    loss = sm.flow_matching_loss(model, x0b, sm.drop_labels(yb, 0.1, 4), sm.logit_normal(64, 0, 1, "cpu"), torch.randn_like(x0b))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 99:
        mse, bayes = sm.denoising_error(model.eval(), toy16, 16, 0.5, 256, torch.device("cpu")); model.train()
        print(f"step {step + 1}: x0-MSE at s=0.5 {mse:.4f} (exact denoiser {bayes:.4f})")"""),
    ("md", """## Few-step Euler collapses toward the mean, even with the exact denoiser
This is the problem distillation solves: FD to the exact mixture falls only with many steps."""),
    ("code", """steps = [1, 2, 4, 8, 16]
fds = [toy.evaluate(toy.euler(400, k, generator=torch.Generator().manual_seed(1)))["fd"] for k in steps]
floor = toy.noise_floor(400)["fd"]
plt.figure(figsize=(5, 3.5)); plt.loglog(steps, fds, "o-", label="exact Euler"); plt.axhline(floor, ls="--", label="noise floor")
plt.xlabel("Euler steps"); plt.ylabel("FD (400 samples)"); plt.legend()
print(dict(zip(steps, [round(v, 1) for v in fds])), "floor", round(floor, 1))"""),
]

DISTILL = [
    ("md", """# 3. Scale-wise distillation, one step opened up
We distil against the exact toy teacher (`--teacher toy`), so the real score is perfect, on a small 16 px world."""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ToyScore, ToyTeacher
torch.manual_seed(0)
c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1)
toy = ToyTeacher(res=16)
real = ToyScore(toy)
x, y = sm.Data(c, torch.device("cpu")).batch(8)"""),
    ("md", """## The generator's inputs at each scale (paper section 4)
Target: the real image area-downsampled to r_i. Input: the image at r_{i-1}, bicubic-upsampled to r_i, noised at s_i."""),
    ("code", """fig, ax = plt.subplots(2, 2, figsize=(5, 5))
for i in range(2):
    x_t, target = sm.scale_wise_inputs(x, i, c.scales, c.sigmas)
    for j, img in enumerate((x_t, target)):
        ax[i, j].imshow((img[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[i, 0].set_title(f"input, {c.scales[i]} px, s={c.sigmas[i]}"); ax[i, 1].set_title("target")"""),
    ("md", """## The DMD gradient
Re-noise the generator's x0_hat, ask the real and the fake score for their clean estimates; the gradient on x0_hat is
their normalised difference. Here the generator and the fake network are the same untrained DiT, so the fake
estimate is poor and the gradient points towards the real one."""),
    ("code", """gen = sm.DiT.from_config(c); fake = sm.DiT.from_config(c)
x_t, target = sm.scale_wise_inputs(x, 1, c.scales, c.sigmas)
x0_hat = sm.to_x0(x_t, 0.6, gen(x_t, 0.6, y)).detach().requires_grad_(True)
s = torch.full((8,), 0.5); x_d = sm.noised(x0_hat, s, torch.randn_like(x0_hat))
with torch.no_grad():
    mu_real = sm.to_x0(x_d, s, real(x_d, s, y)); mu_fake = sm.to_x0(x_d, s, fake(x_d, s, y))
sm.dmd_loss(x0_hat, mu_real, mu_fake).backward()
step = -x0_hat.grad * x0_hat.numel()
print("cosine(-grad, mu_real - mu_fake) =", torch.nn.functional.cosine_similarity(step.flatten(), (mu_real - mu_fake).flatten(), 0).item())"""),
    ("md", """## A short distillation, then the sampler step by step
`sm.distill` runs the whole loop (fake-network updates with the GAN head, then DMD + GAN + patch MMD on the
generator). `scale_wise_sample` returns every step's clean estimate: 8 px, then 16 px."""),
    ("code", """import tempfile
args = ["--preset", "smoke", "--teacher", "toy", "--res", "16", "--scales", "8,16", "--sigmas", "1.0,0.6",
        "--hidden", "64", "--heads", "2", "--depth", "2", "--teacher_steps", "150", "--batch", "64", "--lr", "2e-3",
        "--warmup", "10", "--distill_steps", "60", "--distill_batch", "32", "--fake_updates", "2",
        "--distill_lr", "3e-4", "--log_every", "1000", "--out_dir", tempfile.mkdtemp()]
dc = sm.make_config(args + ["--stage", "distill"])
student = sm.distill(dc, torch.device("cpu"))
init = sm.init_network_for_toy(dc, torch.device("cpu"))
yy = sm.grid_labels(400, 4, "cpu")
for name, g in (("before distillation", init), ("after", student)):
    print(name, {k: round(v, 3) for k, v in toy.evaluate(sm.student_sampler(g, dc, torch.device("cpu"), yy, torch.Generator().manual_seed(0))).items()})"""),
    ("code", """out, traj = sm.student_sampler(student, dc, torch.device("cpu"), sm.grid_labels(6, 4, "cpu"), torch.Generator().manual_seed(1), return_trajectory=True)
fig, ax = plt.subplots(2, 6, figsize=(9, 3.2))
for i, t in enumerate(traj):
    for j in range(6):
        ax[i, j].imshow((t[j].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[i, 0].set_title(f"step {i + 1}: {t.shape[-1]} px", fontsize=8, loc="left")"""),
]

PATCH = [
    ("md", """# 4. The patch loss: what the MMD compares, linear vs RBF
SwD's patch distribution matching takes the tokens (B, N, D) after block k of the fake network, for each generated
image and for *its own* real target, noised alike. Per image, the N tokens of one form a sample set."""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ToyScore, ToyTeacher
torch.manual_seed(0)
c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1)
net = sm.DiT.from_config(c)
for p in net.parameters():  # a random network with live blocks (adaLN-Zero would start them as identities)
    torch.nn.init.normal_(p, std=0.05)
x, y = sm.Data(c, torch.device("cpu")).batch(16)
print("tokens after block 1:", net.features(x, 0.3, y, 1).shape)"""),
    ("md", """## The loss grows with the distortion, and notices what it should
We distort the real images (blur, colour shift, noise) and compare their token features with the originals'."""),
    ("code", """def feats(img, s=0.3, eps=torch.randn(16, 3, 16, 16)):
    return net.features(sm.noised(img, torch.full((16,), s), eps), s, y, 1)
distort = {"blur": lambda t, a: (1 - a) * t + a * sm.upsample(sm.downsample(t, 4), 16),
           "colour shift": lambda t, a: t + 0.5 * a,
           "noise": lambda t, a: t + a * torch.randn_like(t)}
amounts = torch.linspace(0, 1, 6)
fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
with torch.no_grad():
    for name, fn in distort.items():
        for k, kernel in enumerate(("linear", "rbf")):
            v = [sm.patch_mmd(feats(fn(x, float(a))), feats(x), kernel, sigma=10.0).item() for a in amounts]
            ax[k].plot(amounts, v, "o-", label=name)
for k, kernel in enumerate(("linear (pseudo-Huber on token means)", "RBF, unbiased MMD^2")):
    ax[k].set_title(kernel, fontsize=9); ax[k].set_xlabel("distortion"); ax[k].legend(fontsize=7)"""),
    ("md", """## Per image vs batch-pooled
Pooling all tokens of the batch into one set cannot see that image b was paired with the wrong target: shuffling
the real images leaves the pooled loss unchanged, while the per-image loss grows. (The paper: FID 13.6 per image,
16.4 pooled.)"""),
    ("code", """with torch.no_grad():
    f_gen, f_real = feats(x), feats(x)
    shuffled = f_real[torch.roll(torch.arange(16), 1)]
    for pooled in (False, True):
        print(f"pooled={pooled}: matched {sm.patch_mmd(f_gen, f_real, pooled=pooled):.2e}, "
              f"shuffled pairs {sm.patch_mmd(f_gen, shuffled, pooled=pooled):.2e}")"""),
]

NOTEBOOKS = {
    "01_spectral_autoregression.ipynb": SPECTRAL,
    "02_teacher.ipynb": TEACHER,
    "03_scale_wise_distillation.ipynb": DISTILL,
    "04_patch_loss_and_ablations.ipynb": PATCH,
}
