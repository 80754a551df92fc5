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
from toy_teacher import ToyTeacher
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
ax[1].loglog(f, P, "k", label=f"512 images, slope {sm.power_law_fit(f, P)[0]:.2f}")
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
print("the paper's levels (SD3.5):", sm.Config().levels)"""),
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
    ("code", """c = sm.Config(res=16, scales=[8, 16], levels=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1)
toy16 = ToyTeacher(res=16)
model, data = sm.DiT.from_config(c), sm.Data(c, torch.device("cpu"))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

def x0_of(x_t, s, y):  # the network as a denoiser: x0_hat = x_t - s v
    with torch.no_grad():
        return sm.to_x0(x_t, s, model(x_t, s, y))

for step in range(300):
    x, yb = data.batch(64)
    x0b = sm.downsample(x, c.scales[step % 2])
    s = torch.sigmoid(torch.randn(64))  # logit-normal levels, as in SD3
    yb = yb.masked_fill(torch.rand(64) < 0.1, 4)  # label dropout: class 4 is CFG's null class
    loss = sm.flow_matching_loss(model, x0b, yb, s, torch.randn_like(x0b))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 99:
        mse, bayes = toy16.denoising_error(x0_of, 16, 0.5)
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
print(dict(zip(steps, [round(v, 1) for v in fds])), "floor", round(floor, 1))
meter = toy.blur_meter(toy.euler(400, 4, generator=torch.Generator().manual_seed(1)))
print("blur meter of exact Euler, 4 steps, dB per octave band (finest last):", [round(v, 1) for v in meter])"""),
    ("md", r"""**What to notice.** FD falls steadily with the number of steps and approaches the floor only near
16 steps. This gap between 4 and 32 steps is what distillation is for: a 4-step student should sample
like the teacher's 32-step sampler. The blur meter (`toy.blur_meter`: each sample's texture, the sample
minus its component's prototype, against the exact field's power per octave band) says what kind of
miss it is: negative dB everywhere, most in the finest band. A blur, not a wrong mode.

## Exercise

Train the DiT above with `sigma_data=0` (no preconditioning) and compare its $x_0$-MSE after 300 steps
with the preconditioned one. Then replace `flow_matching_loss` with a regression onto the exact
velocity, `toy16.velocity(x_t, s, y)`: it has the same minimiser but no target variance. Which one
converges faster, and why?"""),
]

DISTILL = [
    ("md", r"""# 3. Scale-wise distillation, one iteration by hand

The student $G$ is a copy of a denoiser that makes an image in $K = 2$ steps here: 8 px at $s_1 = 1$,
then 16 px at $s_2 = 0.5$. It is trained with DMD (distribution matching distillation, Yin et al. 2024),
whose gradient on a generated image $\hat x_0$ is the difference of two denoisers applied to a re-noised
copy $x_s = (1-s)\hat x_0 + s\varepsilon$:

$$\nabla_{\hat x_0}\mathcal L_\text{DMD} \propto \frac{\mu_\text{fake}(x_s) - \mu_\text{real}(x_s)}{\operatorname{mean}|\hat x_0 - \mu_\text{real}(x_s)|} .$$

$\mu_\text{real}$ is the teacher's clean estimate; $\mu_\text{fake}$ that of a *fake score* trained on the
student's own samples. Here the real score is the exact toy denoiser, so whatever goes wrong belongs to
the method. The fake score is the real score plus a learned correction that starts at zero (`--fake
residual`), the structure of the official code, where the fake score is the teacher with LoRA adapters
and the real score the same network with the adapters off."""),
    ("code", """import copy, torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ExactVelocity, ToyTeacher
torch.manual_seed(0)
device = torch.device("cpu")
c = sm.Config(res=16, scales=[8, 16], levels=[1.0, 0.5], hidden=64, depth=2, heads=2, feat_block=1,
              teacher="toy", teacher_target="exact", teacher_steps=300, batch=64, lr=2e-3, warmup=10,
              distill_batch=16, fake_updates=2, distill_lr=1e-4, fake_loss="eps")
toy = ToyTeacher(res=16)
real = ExactVelocity(toy)  # the perfect real score, called like a DiT: (x, s, y) -> velocity
data = sm.Data(c, device)"""),
    ("md", r"""## The start: a network regressed onto the exact velocity

The exact teacher is no network, so the student needs one to start from. We train it in the open:
`sm.teacher_step` with `teacher_target="exact"` regresses a DiT onto the exact velocity $\mathbb E[\varepsilon -
x_0 \mid x_t]$, flow matching's own minimiser, at both scales. This is what `python swd_mini.py --stage
teacher --teacher_target exact` does, and what `--stage distill --teacher toy` trains first when
`teacher.pt` is missing."""),
    ("code", """start = sm.DiT.from_config(c)
ema = copy.deepcopy(start).requires_grad_(False)
opt, guard = torch.optim.AdamW(start.parameters(), lr=c.lr, fused=True), sm.Guard()
for step in range(c.teacher_steps):
    loss, r = sm.teacher_step(step, start, start, ema, opt, data, c, guard)

def x0_of(x_t, s, y):
    with torch.no_grad():
        return sm.to_x0(x_t, s, ema(x_t, s, y))
for s in (0.25, 0.75):
    mse, bayes = toy.denoising_error(x0_of, 16, s)
    print(f"s = {s}: the start's x0-MSE is {mse / bayes:.2f} x the exact denoiser's")"""),
    ("md", r"""The generator and the fake network are copies of this start; the fake network's output layer is
set to zero, so at first the fake score *is* the real one and the DMD gradient is exactly zero. It
grows only as the fake network learns how the student's samples differ from the data."""),
    ("code", """student = sm.Student.start(c, device, ema)  # generator, fake network, GAN head, optimisers
x, y = data.batch(4)
s = torch.full((4,), 0.5)
with torch.no_grad():
    x_s = sm.noised(sm.downsample(x, 16), s, torch.randn(4, 3, 16, 16))
    print("fake score - real score at the start:",
          (sm.fake_score(student.fake, real(x_s, s, y), x_s, s, y, c) - real(x_s, s, y)).abs().max().item())"""),
    ("md", r"""## The generator's training inputs (paper section 4)

For step $i$ the target is the real image area-downsampled to $r_i$, and the input is the image at
$r_{i-1}$, bicubic-upsampled to $r_i$ and noised at $s_i$: exactly what the sampler will feed it."""),
    ("code", """fig, ax = plt.subplots(2, 2, figsize=(4.5, 4.5))
for i in range(2):
    x_t, target = sm.scale_wise_inputs(x, i, c.scales, c.levels)
    for j, img in enumerate((x_t, target)):
        ax[i, j].imshow((img[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[i, 0].set_title(f"input {c.scales[i]} px, s={c.levels[i]}", fontsize=8)
    ax[i, 1].set_title("target", fontsize=8)"""),
    ("md", r"""**What to notice.** The first step's input is pure noise at 8 px; the second step's input is a blurry
16 px image under noise, and its target adds the detail that the 8 px image could not hold.

## Half one: the fake network's loss, written out

The fake network learns to denoise the student's samples. Its loss is an $x_0$ error weighted per
noise level, here $w(s) = ((1-s)/s)^2$, which makes it the $\varepsilon$-prediction error
(`fake_loss="eps"`; SwD's own code leaves $w = 1$). We compute it by hand for one batch and check
it against `sm.fake_losses`."""),
    ("code", """x, y = data.batch(8)
x_t, target = sm.scale_wise_inputs(x, 1, c.scales, c.levels)
with torch.no_grad():
    x0_g = sm.to_x0(x_t, 0.5, student.gen(x_t, 0.5, y))  # the student's samples at 16 px
s, eps = torch.empty(8).uniform_(*c.fake_levels), torch.randn_like(x0_g)
x_s = sm.noised(x0_g, s, eps)
with torch.no_grad():
    v_real = real(x_s, s, y)
v_fake = v_real + student.fake(x_s, s, y, skip=False)  # the real score plus the correction c_out F
err = (sm.to_x0(x_s, s, v_fake) - x0_g).pow(2).mean((1, 2, 3))
by_hand = (((1 - s) / s) ** 2 * err).mean()
ours, _ = sm.fake_losses(student.fake, student.head, v_real, x0_g, target, y, s, eps, c)
print(f"fake loss by hand {by_hand.item():.6f}, sm.fake_losses {ours.item():.6f}")"""),
    ("md", r"""`sm.fake_score_step` does this for `c.fake_updates` fresh batches, adds the GAN head's
discriminator loss on the fake network's block tokens, and takes an AdamW step each time."""),
    ("code", """first, last, loss_d = sm.fake_score_step(student, real, data, c, 1, guard)
print(f"fake loss {first.item():.4f} -> {last.item():.4f}, discriminator loss {loss_d.item():.4f}")"""),
    ("md", r"""## Inside half two: the DMD gradient as images

We compute by hand, for one batch at 16 px, the quantities `sm.generator_step` uses: the
generator's $\hat x_0$, its re-noised copy, the real and fake estimates, and the normalised DMD
gradient (`sm.dmd_loss` turns it into a loss whose gradient it is)."""),
    ("code", """x, y = data.batch(4)
x_t, target = sm.scale_wise_inputs(x, 1, c.scales, c.levels)
x0_hat = sm.to_x0(x_t, 0.5, student.gen(x_t, 0.5, y)).detach()
s = torch.full((4,), 0.3)
x_s = sm.noised(x0_hat, s, torch.randn_like(x0_hat))
with torch.no_grad():
    v_real = real(x_s, s, y)
    mu_real = sm.to_x0(x_s, s, v_real)
    mu_fake = sm.to_x0(x_s, s, sm.fake_score(student.fake, v_real, x_s, s, y, c))
grad = (mu_fake - mu_real) / (x0_hat - mu_real).abs().mean((1, 2, 3), keepdim=True)
cols = {"x0_hat": x0_hat, "x_s": x_s, "mu_real": mu_real, "mu_fake": mu_fake, "DMD gradient": 4 * grad}
fig, ax = plt.subplots(2, 5, figsize=(10, 4.2))
for j, (name, img) in enumerate(cols.items()):
    for i in range(2):
        ax[i, j].imshow((img[i].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[0, j].set_title(name, fontsize=9)
print("RMS of the normalised DMD gradient:", grad.pow(2).mean().sqrt().item())"""),
    ("md", r"""**What to notice.** `mu_real` and `mu_fake` look alike: after two fake updates the correction is
still small, and so is the gradient (its RMS is printed; shown here 4x). It lives where the student's
samples differ from the data as the fake network sees it. That is DMD's weak point: the gradient is
only as good as the fake score, and near the data the fake network's own error is as large as the signal.

## The patch loss, written out

The third loss compares the tokens of a generated image after block $k$ of the fake network with those
of its own real target, both noised with the same $\varepsilon$ at the same level. With the linear
kernel the MMD reduces to the difference of the two images' mean tokens, passed through a
pseudo-Huber $\sqrt{d^2 + c^2} - c$ and averaged."""),
    ("code", """s_m, eps_m = torch.full((4,), 0.3), torch.randn_like(x0_hat)
with torch.no_grad():
    f_gen = student.fake.features(sm.noised(x0_hat, s_m, eps_m), s_m, y, c.feat_block)  # (B, N, D)
    f_real = student.fake.features(sm.noised(target, s_m, eps_m), s_m, y, c.feat_block)
d = f_gen.mean(1) - f_real.mean(1)  # (B, D): each image's mean token minus its target's
by_hand = ((d ** 2 + 1e-3 ** 2).sqrt() - 1e-3).mean()
print(f"patch loss by hand {by_hand.item():.6f}, sm.patch_mmd {sm.patch_mmd(f_gen, f_real).item():.6f}")"""),
    ("md", r"""## Half two: the generator update

`sm.generator_step` draws a fresh batch, computes the DMD, GAN and patch terms (`sm.generator_losses`)
and takes one AdamW step of $G$."""),
    ("code", """terms = sm.generator_step(student, real, data, c, 1, guard)
print({k: round(v.item(), 5) for k, v in terms.items()})"""),
    ("md", r"""## A short run, measured against the truth

`sm.distill_iteration` is the two halves in order. We run 40 iterations, alternating the scales, and
compare the student with its start by exact FD (400 samples) and the blur meter's finest band (0 dB is
the exact texture; a blur reads negative)."""),
    ("code", """def measure(gen):
    _, steps = sm.student_sampler(gen, c, torch.arange(400) % 4, torch.Generator().manual_seed(0),
                                  return_trajectory=True)
    row = toy.curve_row(steps, parts=False)
    return round(row["fd"], 1), round(row["meter"][16][-1], 2)
before = measure(student.gen)
for step in range(40):
    sm.distill_iteration(student, real, data, c, step % 2, guard, step)
after = measure(student.gen)
print(f"exact FD, finest band dB: start {before}, after 40 iterations {after}; "
      f"floor {toy.noise_floor(400)['fd']:.1f}")
_, traj = sm.student_sampler(student.gen, c, torch.arange(6) % 4, torch.Generator().manual_seed(1),
                             return_trajectory=True)
fig, ax = plt.subplots(2, 6, figsize=(9, 3.2))
for i, t in enumerate(traj):
    for j in range(6):
        ax[i, j].imshow((t[j].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1)); ax[i, j].axis("off")
    ax[i, 0].set_title(f"step {i + 1}: {t.shape[-1]} px", fontsize=8, loc="left")"""),
    ("md", r"""**What to notice.** Compare the two printed rows: forty iterations are few, and how far they move the
student depends on how well the fake network has learned the student's samples. The trajectory shows the
method's shape: step 1 lays out colour and layout at 8 px, step 2 adds the 16 px detail. The README's
convergence section measures, on the full-size toy preset, where this stops and why.

## Exercise

Build the student with `c.fake = "copy"` (DMD2's fake score: a trained copy of the start, not the real
score plus a correction) and print the fake-minus-real difference at the start again. Then run the 40
iterations with each and compare the finest band. Which one starts with a non-zero DMD gradient at the
data, and what is that gradient made of?"""),
]

PATCH = [
    ("md", r"""# 4. The patch loss, and what limits distillation

SwD's third loss (paper section 6) compares *token features* of a generated image with those of its own
real target: both are noised alike, passed through the fake network, and the $N$ tokens after block $k$
of each image form two sample sets. The maximum mean discrepancy between them is

$$\mathrm{MMD}^2 = \mathbb E\,k(a, a') + \mathbb E\,k(b, b') - 2\,\mathbb E\,k(a, b).$$

With the linear kernel $k(a, b) = a\cdot b$ this is the squared distance between the two sets' mean
tokens; SwD applies a pseudo-Huber $\sqrt{d^2 + c^2} - c$ to each feature's mean difference. With an RBF
kernel $k(a, b) = e^{-|a-b|^2 / 2\sigma^2}$ it compares whole distributions; the official code drops the
diagonal of the within-set sums. `sm.patch_mmd` does both, with $\sigma$ from the median heuristic.
The second half of the lesson measures, on the exact toy world, what DMD itself can and cannot do."""),
    ("code", """import copy, math, torch, matplotlib.pyplot as plt
import swd_mini as sm
from toy_teacher import ExactVelocity, ToyTeacher
torch.manual_seed(0)
c = sm.Config(res=16, scales=[8, 16], levels=[1.0, 0.5], hidden=64, depth=2, heads=2, feat_block=1)
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
bandwidth reacts to both.

## Per image against batch-pooled

SwD compares each generated image with its own target. Pooling all tokens of the batch into one set
cannot see that image $b$ was paired with the wrong target (the paper: FID 13.6 per image, 16.4 pooled)."""),
    ("code", """with torch.no_grad():
    f_gen, f_real = feats(x), feats(x)
    shuffled = f_real[torch.roll(torch.arange(16), 1)]
    for pooled in (False, True):
        print(f"pooled={pooled}: matched {sm.patch_mmd(f_gen, f_real, pooled=pooled):.2e}, "
              f"shuffled pairs {sm.patch_mmd(f_gen, shuffled, pooled=pooled):.2e}")"""),
    ("md", r"""**What to notice.** Matched pairs score zero either way. With shuffled pairs the per-image loss is
large and the pooled one stays at zero: pooling throws away the pairing.

## The smallest case DMD must get right

A generator with one gain per frequency ring on the toy world's texture (`toy.ring_gain_sample`) has a
known law: the toy world with spectrum $g(k)^2 P(k)$. Starting from $g = 0.5$, a blur, DMD should bring
every gain to 1. We run it through `sm.distill_iteration`, the real two halves, with the exact real score
and a *learned* fake score, once as DMD2 builds it (a trained copy of a denoiser, `fake="copy"`) and
once as the official SwD code does (the real score plus a correction that starts at zero,
`fake="residual"`). The start network is a small DiT regressed onto the exact velocity."""),
    ("code", """toy = ToyTeacher(res=16)
c = sm.Config(res=16, scales=[16], levels=[1.0], hidden=64, depth=2, heads=2, feat_block=1, teacher="toy",
              teacher_target="exact", batch=64, lr=2e-3, warmup=10, fake_loss="eps", distill_batch=32,
              fake_updates=3, fake_lr=3e-4, gan_weight=0, mmd_weight=0)
data, guard, real = sm.Data(c, torch.device("cpu")), sm.Guard(), ExactVelocity(toy)
start = sm.DiT.from_config(c)
ema = copy.deepcopy(start).requires_grad_(False)
opt = torch.optim.AdamW(start.parameters(), lr=c.lr, fused=True)
for step in range(150):
    sm.teacher_step(step, start, start, ema, opt, data, c, guard)

class RingGen(torch.nn.Module):  # called like a DiT at s = 1: its velocity's x0 is the ring-gain sample
    def __init__(self):
        super().__init__()
        self.log_gain, self.num_classes = torch.nn.Parameter(torch.full((12,), math.log(0.5))), 4
    def forward(self, z, s, y, **kw):
        field = torch.fft.ifft2(self.log_gain.exp()[toy.rings()] * toy.P.float().sqrt()
                                * torch.fft.fft2(z, norm="ortho"), norm="ortho").real
        return z - (toy.mu.float()[2 * y + (z[:, 0, 0, 0] > 0).long()] + field)

gains = {}
for kind in ("copy", "residual"):
    cc = sm.dataclasses.replace(c, fake=kind)
    student = sm.Student.start(cc, torch.device("cpu"), ema)
    student.gen = RingGen()
    student.opt_gen = torch.optim.Adam(student.gen.parameters(), lr=0.01, fused=True)
    for step in range(60):
        sm.distill_iteration(student, real, data, cc, 0, guard, step)
    gains[kind] = student.gen.log_gain.exp().detach()
    print(f"{kind:8s} gains {[round(v, 2) for v in gains[kind].tolist()]}")
plt.figure(figsize=(5, 3))
for kind, g in gains.items():
    plt.plot(g, "o-", label=kind)
plt.axhline(1, color="k", ls=":"); plt.axhline(0.5, color="gray", ls=":")
plt.xlabel("frequency ring (cycles per image)"); plt.ylabel("gain after 60 iterations"); plt.legend()"""),
    ("md", r"""**What to notice.** With the copied fake network the gains fall *below* their start: its own error,
as large as the signal near the data, pushes the generator further into the blur. With the residual fake
score the gains rise most of the way to 1 in every ring within these 60 iterations: the fake score
starts equal to the real one, learns only the difference, and that difference shrinks to zero as the
generator reaches the data. The same
experiment with the exact fake score converges to 1 within 1% (a test in `tests/test_distill.py`).

## Why full-resolution DMD collapses within classes

DMD can move probability between the two components of a class only at noise levels where the noisy
image does not yet say which component it came from. `toy.mode_entropy` measures that: the entropy of
the exact posterior's within-class weights, in bits."""),
    ("code", """levels = [0.2, 0.5, 0.7, 0.8, 0.9, 0.95]
world = ToyTeacher()
for r in (8, 32):
    print(f"{r:2d} px:", [round(v, 2) for v in world.mode_entropy(r, levels, n=256)], "bits at s =", levels)"""),
    ("md", r"""**What to notice.** At 32 px the component is decided (0 bits) up to about $s = 0.8$, so DMD re-noising
in SwD's range $[0.01, 0.79]$ carries no signal for the balance between the two components; at 8 px the
same levels still leave part of it open. SwD's first step, at 8 px, is where the mode is chosen.

## Exercise

Rerun the ring-gain experiment with `fake_loss="x0"` (SwD's unweighted $x_0$ loss) and with 1 fake update
instead of 3. Which change hurts the residual fake score more, and why does the weighting at low noise
matter for a texture that only low noise reveals?"""),
]

NOTEBOOKS = {
    "01_spectral_autoregression.ipynb": SPECTRAL,
    "02_teacher.ipynb": TEACHER,
    "03_scale_wise_distillation.ipynb": DISTILL,
    "04_patch_loss_and_ablations.ipynb": PATCH,
}
