"""The cells of the four step-through notebooks (built by notebooks/build.py, run by
tests/test_notebooks.py). Each is a lesson: prose with the equation, short code cells, "what to
notice" after each figure, an exercise at the end."""

SPECTRAL = [
    ("md", r"""# 1. Spectral autoregression: why a noisy step needs few pixels

Scale-wise distillation (SwD, Starodubcev et al. 2025) rests on one observation, made in section 2 of
the paper: the forward process

$$x_t = (1-s)\,x_0 + s\,\varepsilon, \qquad \varepsilon \sim \mathcal N(0, I),\quad s\in[0,1],$$

drowns the high frequencies of an image first. If a step's input holds nothing but noise above some
frequency, the step can run at a resolution whose Nyquist frequency is just that high, and a 4-step
sampler can start at 8 px and end at 32 px. This notebook measures the observation on the toy world of
`toy_teacher.py`, where the data distribution is known exactly, and ends with the experiment that fixes
the *order* of operations in the sampler."""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ToyScore, ToyTeacher
toy = ToyTeacher()
x0, y = toy.sample(512, generator=torch.Generator().manual_seed(0))
print(x0.shape, "images in [-1, 1]")"""),
    ("md", r"""## The power spectrum of images

`sm.rapsd` is the radially averaged power spectral density: the 2-D FFT, squared, averaged over rings
of equal frequency $|k|$,

$$P(k) = \frac{1}{HW}\,\big\langle |\hat x(\mathbf k)|^2 \big\rangle_{|\mathbf k| = k}.$$

With this normalisation white noise of variance $v$ has a flat spectrum at $v$. Photographs follow a
power law, $P(k) \propto k^{-\alpha}$ with $\alpha \approx 2$; the toy world was built to do the same."""),
    ("code", """f, p1 = sm.rapsd(x0[:1])
f, P = sm.rapsd(x0)
fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
ax[0].imshow((x0[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[0].axis("off")
ax[1].loglog(f, p1, label="this image")
ax[1].loglog(f, P, "k", label=f"512 images, slope {sm.power_law_slope(f, P):.2f}")
ax[1].set_xlabel("cycles / pixel"); ax[1].legend()"""),
    ("md", r"""**What to notice.** One image's spectrum is ragged, the average over 512 is a straight line on log-log
axes: most of the power sits at low frequency, and each octave up holds about four times less.

## Noise is flat, so it wins at high frequency

In $x_t$ the signal contributes $(1-s)^2 P(k)$ and the noise a flat $s^2$. They cross at the frequency

$$k^*(s):\quad (1-s)^2\,P(k^*) = s^2 ,$$

above which the input is mostly noise. `sm.crossover` finds it by interpolating between rings."""),
    ("code", """fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
ax[0].loglog(f, P, "k", lw=2, label="data")
for s in (0.3, 0.6, 0.9):
    ax[0].loglog(f, (1 - s) ** 2 * P, label=f"signal at s={s}")
    ax[0].axhline(s ** 2, ls="--", lw=0.8)
ax[0].set_xlabel("cycles / pixel"); ax[0].legend(fontsize=7)
grid = torch.linspace(0.05, 0.95, 40)
ax[1].semilogy(grid, [sm.crossover(f, P, float(s)) for s in grid], "k")
ax[1].set_xlabel("noise level s"); ax[1].set_ylabel("k*(s), cycles / pixel")"""),
    ("md", r"""**What to notice.** Each dashed noise floor cuts the signal line at a lower frequency as $s$ grows
(left), and $k^*(s)$ falls steadily (right). At $s = 0.9$ only the lowest few rings carry signal, which
an 8 px image (Nyquist 4 cycles per 8 px, i.e. 1/8 cycles per full-resolution pixel) can hold.

## The order experiment: upsample, then noise

The sampler moves from scale $r$ to $2r$ between steps. Two ways come to mind:

* (a) upsample the clean prediction $\hat x_0$ to $2r$, then add fresh noise at $2r$;
* (b) add noise at $r$, then upsample the noisy image.

Only (a) gives an input whose statistics match a true $x_t$ at $2r$: in (b) the noise itself is
upsampled, so it is no longer white and its high frequencies are missing. We compare both with a true
$x_t$ by spectrum and by how well the exact denoiser recovers $x_0$ from them."""),
    ("code", """s, r = 0.5, 16
g = torch.Generator().manual_seed(1)
small = sm.downsample(x0, r)
truth = sm.noised(x0, s, torch.randn(x0.shape, generator=g))
a = sm.noised(sm.upsample(small, 32), s, torch.randn(x0.shape, generator=g))
b = sm.upsample(sm.noised(small, s, torch.randn(small.shape, generator=g)), 32)
plt.figure(figsize=(5, 3.5))
for name, z in (("true x_t", truth), ("(a) up, then noise", a), ("(b) noise, then up", b)):
    mse = torch.nn.functional.mse_loss(toy.denoise(z, s, y), x0).item()
    plt.loglog(*sm.rapsd(z), label=name)
    print(f"{name:20s} exact-denoiser x0-MSE {mse:.4f}, "
          f"spectral distance to the true x_t {sm.spectral_distance(z, truth):.2f} dB")
plt.xlabel("cycles / pixel"); plt.legend(fontsize=8)"""),
    ("md", r"""**What to notice.** Curve (a) lies on the true $x_t$'s spectrum at every frequency (a fraction of a
dB away), and the exact denoiser does as well from (a) as from the true input. Curve (b) loses its top
octave, about 9 dB off: the noise there was upsampled away, the input is no longer a possible $x_t$, and
even the exact denoiser's error grows by about a third. The paper's table 1 makes the same point with a
real model; `scale_wise_sample` therefore upsamples $\hat x_0$ and re-noises.

## From the spectrum to a schedule

`sm.auto_schedule` (ours, not the paper's) picks for each step the least noise level that drowns, by a
margin, what the previous smaller scale cannot hold. The paper chose its levels by hand."""),
    ("code", """for margin in (1.0, 4.0, 16.0):
    levels = sm.auto_schedule(f, P, [8, 16, 24, 32], margin)
    print(f"margin {margin:5.1f}: levels", [round(v, 3) for v in levels])
print("the paper's levels (SD3.5):", sm.Config().sigmas)"""),
    ("md", r"""**What to notice.** A larger margin asks for more noise at each step. With this spectrum the rule
asks for far less noise than SD3.5's hand-picked 0.9, 0.75, 0.6: the toy world's detail is faint.

## Exercise

Make the spectrum steeper: build `ToyTeacher(slope=3.0)`, recompute $P(k)$ and `auto_schedule`. Predict
first whether the later steps need more or less noise than with `slope=2.0`, then check. Then repeat the
order experiment at $s = 0.3$ and at $s = 0.9$: where is the gap between (a) and (b) largest, and why?"""),
]

TEACHER = [
    ("md", r"""# 2. The teacher: the exact toy world, a small DiT, and few-step Euler's collapse

SwD distils a *teacher*: a diffusion model trained with rectified flow. Under
$x_t = (1-s)x_0 + s\varepsilon$ the network predicts the velocity $v = \varepsilon - x_0$ and is trained with

$$\mathcal L(\theta) = \mathbb E_{x_0, \varepsilon, s}\,\big\| v_\theta(x_t, s, y) - (\varepsilon - x_0)\big\|^2 ,$$

whose minimiser is the conditional mean $\mathbb E[\varepsilon - x_0 \mid x_t]$. The clean estimate follows
as $\hat x_0 = x_t - s\,v$. The toy world knows this mean in closed form, so we can see how far a small
network is from the best possible denoiser, and what few-step sampling costs even with a perfect one."""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ToyTeacher
toy = ToyTeacher()
torch.manual_seed(0)"""),
    ("md", r"""## The exact denoiser

`toy.denoise(x_t, s)` is the posterior mean $\mathbb E[x_0 \mid x_t]$ (Tweedie's formula): the estimate
with the least squared error any network can reach."""),
    ("code", """x0, y = toy.sample(1, generator=torch.Generator().manual_seed(3))
fig, ax = plt.subplots(2, 4, figsize=(8, 4))
for j, s in enumerate((0.2, 0.5, 0.8, 0.95)):
    x_t = (1 - s) * x0 + s * torch.randn_like(x0)
    for i, img in enumerate((x_t, toy.denoise(x_t, s))):
        ax[i, j].imshow((img[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[0, j].set_title(f"x_t, s={s}"); ax[1, j].set_title("E[x0|x_t]")"""),
    ("md", r"""**What to notice.** At $s = 0.2$ the mean is nearly the image; at $s = 0.95$ it is a blur of the
class's two colour schemes, because the noisy input no longer says which one it came from. That blur
is the right answer to a squared-error question, and it is why one Euler step cannot make a sharp image.

## A small DiT, trained at every scale

The teacher sees each batch at one scale of the schedule (here 8 or 16 px). The DiT uses EDM-style
preconditioning (`sm.precondition`): $v_\theta = c_\text{skip}x_t + c_\text{out}F(c_\text{in}x_t, s)$,
so the transformer only predicts what a linear guess cannot. We track its $x_0$ error against the exact
denoiser's on the same inputs."""),
    ("code", """c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1)
toy16 = ToyTeacher(res=16)
model, data = sm.DiT.from_config(c), sm.Data(c, torch.device("cpu"))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
for step in range(300):
    x, yb = data.batch(64)
    x0b = sm.downsample(x, c.scales[step % 2])
    s = sm.logit_normal(64, 0.0, 1.0, "cpu")
    loss = sm.flow_matching_loss(model, x0b, sm.drop_labels(yb, 0.1, 4), s, torch.randn_like(x0b))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 99:
        mse, bayes = sm.denoising_error(model.eval(), toy16, 16, 0.5, 256, torch.device("cpu"))
        model.train()
        print(f"step {step + 1}: x0-MSE at s=0.5 {mse:.4f}, exact denoiser {bayes:.4f}")"""),
    ("md", r"""**What to notice.** The network's error falls towards the exact one but stays above it: the ratio
is what a network of this size and budget buys. The README's teacher table reports it per scale and level.

## Few-step Euler collapses, even with the exact denoiser

Euler integrates $dx/ds = v(x, s)$ from $s = 1$ to $0$. With few steps each step lands on a posterior
mean, i.e. a blur, and the samples lose their fine texture. We measure the Fréchet distance (FD) to the
exact mixture, against the noise floor (two independent draws of real data)."""),
    ("code", """steps = [1, 2, 4, 8, 16]
fds = [toy.evaluate(toy.euler(400, k, generator=torch.Generator().manual_seed(1)))["fd"] for k in steps]
floor = toy.noise_floor(400)["fd"]
plt.figure(figsize=(5, 3.5)); plt.loglog(steps, fds, "o-", label="exact Euler")
plt.axhline(floor, ls="--", label="noise floor")
plt.xlabel("Euler steps"); plt.ylabel("FD (400 samples)"); plt.legend()
print(dict(zip(steps, [round(v, 1) for v in fds])), "floor", round(floor, 1))"""),
    ("md", r"""**What to notice.** FD falls steadily with the number of steps and approaches the floor only near
16 steps. This gap between 4 and 32 steps is what distillation is for: a 4-step student should sample
like the teacher's 32-step sampler.

## Exercise

Train the DiT above with `sigma_data=0` (no preconditioning) and compare its $x_0$-MSE after 300 steps
with the preconditioned one. Then replace `flow_matching_loss` with a regression onto the exact
velocity, `toy16.velocity(x_t, s, y)`: it has the same minimiser but no target variance. Which one
converges faster, and why?"""),
]

DISTILL = [
    ("md", r"""# 3. Scale-wise distillation, one iteration by hand

The student $G$ is a copy of the teacher that makes an image in $K = 2$ steps here: 8 px at $s_1 = 1$,
then 16 px at $s_2 = 0.6$. It is trained with DMD (distribution matching distillation, Yin et al. 2024),
whose gradient on a generated image $\hat x_0$ is the difference of two denoisers applied to a re-noised
copy $x_s = (1-s)\hat x_0 + s\varepsilon$:

$$\nabla_{\hat x_0}\mathcal L_\text{DMD} \propto \frac{\mu_\text{fake}(x_s) - \mu_\text{real}(x_s)}{\operatorname{mean}|\hat x_0 - \mu_\text{real}(x_s)|} .$$

$\mu_\text{real}$ is the teacher's clean estimate; $\mu_\text{fake}$ comes from a *fake* network trained
on the student's own samples, so it denoises towards whatever the student makes now. The gradient moves
samples from where the student puts them towards where the data is. A GAN head on the fake network's
tokens and the patch MMD loss (notebook 4) add to it. Here the real score is the exact toy denoiser,
so any flaw we see belongs to the method, not the teacher."""),
    ("code", """import torch, matplotlib.pyplot as plt, tempfile
import swd_mini as sm
from toy_teacher import ToyScore, ToyTeacher
torch.manual_seed(0)
device = torch.device("cpu")
c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1,
              teacher="toy", teacher_steps=1500, batch=64, lr=2e-3, warmup=10, distill_batch=16,
              fake_updates=2, distill_lr=1e-4, fake_lr=3e-4, log_every=1000, out_dir=tempfile.mkdtemp())
toy = ToyTeacher(res=16)
real = ToyScore(toy)  # the perfect real score
data = sm.Data(c, device)
init = sm.init_network_for_toy(c, device)  # a DiT regressed onto the exact velocity (~20 s)
student = sm.make_student(c, device, init)  # generator, its EMA, fake network, GAN head, optimisers
print(type(student).__name__, [f for f in student.state()])"""),
    ("md", r"""## The generator's training inputs (paper section 4)

For step $i$ the target is the real image area-downsampled to $r_i$, and the input is the image at
$r_{i-1}$, bicubic-upsampled to $r_i$ and noised at $s_i$: exactly what the sampler will feed it."""),
    ("code", """x, y = data.batch(4)
fig, ax = plt.subplots(2, 2, figsize=(4.5, 4.5))
for i in range(2):
    x_t, target = sm.scale_wise_inputs(x, i, c.scales, c.sigmas)
    for j, img in enumerate((x_t, target)):
        ax[i, j].imshow((img[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[i, 0].set_title(f"input {c.scales[i]} px, s={c.sigmas[i]}", fontsize=8)
    ax[i, 1].set_title("target", fontsize=8)"""),
    ("md", r"""**What to notice.** The first step's input is pure noise at 8 px; the second step's input is a blurry
16 px image under noise, and its target adds the detail that the 8 px image could not hold.

## Half one: the fake score and the discriminator

`sm.fake_score_step` draws fresh student samples at scale $i$, noises them, and takes
`c.fake_updates` AdamW steps on the fake network's denoising loss $\|\hat x_0^\text{fake}(x_s) - \hat x_0\|^2$,
plus the discriminator loss of the GAN head."""),
    ("code", """loss_fake, loss_d = sm.fake_score_step(student, real, data, c, 1, device)
print(f"fake-network loss {loss_fake.item():.4f}, discriminator loss {loss_d.item():.4f}")"""),
    ("md", r"""## Inside half two: the DMD gradient as images

Before calling `sm.generator_step`, we compute by hand the quantities it computes for one batch at
16 px: the generator's $\hat x_0$, its re-noised copy, the real and fake estimates, and the normalised
DMD gradient (`sm.dmd_loss` turns it into a loss whose gradient it is)."""),
    ("code", """x, y = data.batch(4)
x0_hat, target, y = sm.generate(student.gen, x, y, 1, c, device)
s = torch.full((4,), 0.5)
x_s = sm.noised(x0_hat, s, torch.randn_like(x0_hat))
with torch.no_grad():
    mu_real = sm.to_x0(x_s, s, real(x_s, s, y))
    mu_fake = sm.to_x0(x_s, s, student.fake(x_s, s, y))
grad = (mu_fake - mu_real) / (x0_hat - mu_real).abs().mean((1, 2, 3), keepdim=True)
cols = {"x0_hat": x0_hat, "x_s": x_s, "mu_real": mu_real, "mu_fake": mu_fake, "DMD gradient": grad / 4}
fig, ax = plt.subplots(2, 5, figsize=(10, 4.2))
for j, (name, img) in enumerate(cols.items()):
    for i in range(2):
        ax[i, j].imshow((img[i].detach().permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[0, j].set_title(name, fontsize=9)
print("RMS of the normalised DMD gradient:", grad.pow(2).mean().sqrt().item())"""),
    ("md", r"""**What to notice.** `mu_real`, the exact denoiser's answer, is a clean shape of the class; `mu_fake`
reproduces the student's own flaws (a squarish blob, soft edges), because the fake network has learned
what the student makes. The gradient lives where the two differ, along the shape's edges: it pulls the
student's square towards the disc. Its size is in units of the real denoiser's own correction
$|\hat x_0 - \mu_\text{real}|$; part of it is the fake network's error rather than the student's, which
the README measures as the limit of distillation at this size.

## Half two: the generator update

`sm.generator_step` does the above with random levels in `c.dmd_s`, adds the GAN and patch losses, and
takes one AdamW step of $G$ and its EMA. It returns the loss terms."""),
    ("code", """terms = sm.generator_step(student, real, data, c, 1, device)
print({k: round(v.item(), 5) for k, v in terms.items()})"""),
    ("md", r"""## A short run, then the sampler step by step

`sm.distill_iteration` is the two halves in order. We run 40 iterations, alternating the scales, and
compare the student with its starting point by exact FD and mode KL, on 400 samples."""),
    ("code", """def score(gen):
    yy = sm.grid_labels(400, 4, "cpu")
    x = sm.student_sampler(gen, c, device, yy, torch.Generator().manual_seed(0))
    return {k: round(v, 3) for k, v in toy.evaluate(x).items() if k in ("fd", "mode_kl")}
before = score(student.gen_ema)
for step in range(40):
    sm.distill_iteration(student, real, data, c, step % 2, device)
print("before", before, "after", score(student.gen_ema), "floor", round(toy.noise_floor(400)["fd"], 1))
_, traj = sm.student_sampler(student.gen_ema, c, device, sm.grid_labels(6, 4, "cpu"),
                             torch.Generator().manual_seed(1), return_trajectory=True)
fig, ax = plt.subplots(2, 6, figsize=(9, 3.2))
for i, t in enumerate(traj):
    for j in range(6):
        ax[i, j].imshow((t[j].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[i, 0].set_title(f"step {i + 1}: {t.shape[-1]} px", fontsize=8, loc="left")"""),
    ("md", r"""**What to notice.** Forty iterations move the exact FD only a little: the start, a network regressed
onto the exact velocity and used as a 2-step scale-wise sampler, is already better than the exact
denoiser's own 2-step Euler (FD about 45 at this size and sample count), and from a good start
distillation at this size mostly holds its ground (README, "Convergence"). The trajectory shows the method's shape: step
1 lays out colour and layout at 8 px, step 2 adds the 16 px detail.

## Exercise

Set `c.dmd_weight = 0` and `c.gan_weight = 0` (patch loss only), rebuild the student, and run the 40
iterations again. Then try the opposite, `c.mmd_weight = 0`. Which loss keeps the mode KL low, and which
keeps FD low? Compare with rows 9-12 of the README's diagnosis table."""),
]

PATCH = [
    ("md", r"""# 4. The patch loss: what the MMD compares, linear against RBF

SwD's third loss (paper section 6) compares *token features* of a generated image with those of its own
real target: both are noised alike, passed through the fake network, and the $N$ tokens after block $k$
of each image form two sample sets. The maximum mean discrepancy between them is

$$\mathrm{MMD}^2 = \mathbb E\,k(a, a') + \mathbb E\,k(b, b') - 2\,\mathbb E\,k(a, b).$$

With the linear kernel $k(a, b) = a\cdot b$ this is the squared distance between the two sets' mean
tokens; SwD applies a pseudo-Huber $\sqrt{d^2 + c^2} - c$ to each feature's mean difference. With an RBF
kernel $k(a, b) = e^{-|a-b|^2 / 2\sigma^2}$ it compares whole distributions; the official code drops the
diagonal of the within-set sums. `sm.patch_mmd` does both, with $\sigma$ from the median heuristic."""),
    ("code", """import torch, matplotlib.pyplot as plt
import swd_mini as sm
torch.manual_seed(0)
c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1)
net = sm.DiT.from_config(c)
for p in net.parameters():  # a random network with live blocks (adaLN-Zero starts them as identities)
    torch.nn.init.normal_(p, std=0.05)
x, y = sm.Data(c, torch.device("cpu")).batch(16)
print("tokens after block 1:", tuple(net.features(x, 0.3, y, 1).shape), "= (B, N, D)")"""),
    ("md", r"""## The loss grows with the distortion

We distort the real images (blur, a colour shift, added noise) by a growing amount and compare their
tokens with the originals', noised with the same $\varepsilon$ at $s = 0.3$."""),
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
            v = [sm.patch_mmd(feats(fn(x, float(a))), feats(x), kernel).item() for a in amounts]
            ax[k].plot(amounts, v, "o-", label=name)
for k, title in enumerate(("linear (pseudo-Huber on token means)", "RBF MMD^2, median bandwidth")):
    ax[k].set_title(title, fontsize=9); ax[k].set_xlabel("distortion"); ax[k].legend(fontsize=7)"""),
    ("md", r"""**What to notice.** Both losses are zero for the undistorted images and grow with every distortion.
The linear kernel sees a colour shift at once (it moves every token's mean) but is slower to see added
noise, which changes the spread of the tokens more than their mean. The RBF kernel with the median
bandwidth reacts to both; with a fixed bandwidth far from the token distances (the official 100 was
chosen for SD3.5's features) it would be flat at zero.

## Per image against batch-pooled

SwD compares each generated image with its own target. Pooling all tokens of the batch into one set
cannot see that image $b$ was paired with the wrong target: shuffling the real images leaves the pooled
loss unchanged, while the per-image loss grows. (The paper: FID 13.6 per image, 16.4 pooled.)"""),
    ("code", """with torch.no_grad():
    f_gen, f_real = feats(x), feats(x)
    shuffled = f_real[torch.roll(torch.arange(16), 1)]
    for pooled in (False, True):
        print(f"pooled={pooled}: matched {sm.patch_mmd(f_gen, f_real, pooled=pooled):.2e}, "
              f"shuffled pairs {sm.patch_mmd(f_gen, shuffled, pooled=pooled):.2e}")"""),
    ("md", r"""**What to notice.** Matched pairs score zero either way. With shuffled pairs the per-image loss is
large and the pooled one stays at zero: pooling throws away the pairing that makes the patch loss a
per-image signal.

## Exercise

Pass `sigma=100.0` to `sm.patch_mmd` with the RBF kernel in the distortion plot and explain the flat
curves from the token distances (`torch.cdist`). Then compute the loss at `k = 2` (the second block)
instead of 1: which distortions does the deeper block see better?"""),
]

NOTEBOOKS = {
    "01_spectral_autoregression.ipynb": SPECTRAL,
    "02_teacher.ipynb": TEACHER,
    "03_scale_wise_distillation.ipynb": DISTILL,
    "04_patch_loss_and_ablations.ipynb": PATCH,
}
