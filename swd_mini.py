"""swd_mini.py: Scale-wise Distillation of diffusion models (SwD), in one file.

Noise drowns an image's high frequencies first, so the noisy early steps of a sampler need only a
few pixels. SwD (Starodubcev et al. 2025, arXiv 2503.16397) distils a diffusion model into a
few-step generator whose steps start at low resolution and grow, with distribution matching (DMD,
Yin et al. 2024: a fake-score network; DMD2, Yin et al. 2024b: a GAN head) and a patch loss (MMD
between token features of generated and real images).

Convention everywhere: x_t = (1 - s) x0 + s eps, noise level s in [0, 1] (s = 1 is pure noise);
networks predict the velocity v = eps - x0, so x0_hat = x_t - s v.

    python swd_mini.py                      # teacher, distill, sample, eval, spectra (toy world)
    python swd_mini.py --stage distill      # distil runs/toy/teacher.pt into a 4-step generator
    python swd_mini.py --stage sample --ckpt runs/toy/student.pt --n 10000
    python swd_mini.py --help               # every option, with its default

Reading order: config -> data -> spectra (SwD section 2) -> scales and the scale-wise sampler
(section 3) and its training inputs (section 4) -> the DiT -> the teacher's loss -> distillation's
losses and the two halves of an iteration (sections 5-6) -> samplers -> the training loops ->
measuring (metrics, eval, bench, figures) -> plumbing (checkpoints, devices, torchrun, flags).
"""
import argparse
import copy
import dataclasses
import functools
import gzip
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
#                                           Config
# ------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Every setting, each a flag (--name value); the comment lines below are --help's groups."""
    # run
    preset: str = "toy"  # named preset the other defaults come from (see PRESETS)
    stage: str = "all"  # teacher | distill | sample | eval | spectra | bench | all (the first five)
    out_dir: str = ""  # checkpoints, grids, log.jsonl and tables; "" means runs/<preset>
    seed: int = 0  # seeds every random draw of training and sampling
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cuda | mps | cpu
    compile: bool = False  # torch.compile networks and losses (slow to start, pays on a GPU)
    precision: str = ""  # bf16 | fp32 autocast; "" means bf16 on CUDA and fp32 elsewhere
    resume: bool = False  # continue the stage from its checkpoint in out_dir
    # data
    data: str = "toy"  # toy (toy_teacher.py's exact world) | fmnist | cifar10 | imagenet64 | folder
    data_dir: str = ""  # where the dataset lives; "" means the source's usual place
    res: int = 32  # full image resolution, the last scale
    channels: int = 3  # image channels
    num_classes: int = 4  # class labels (1: unconditional); label num_classes is CFG's null class
    flip: str = "auto"  # mirror a random half of each batch: true | false | auto (real photos only)
    workers: int = 4  # DataLoader processes that decode --data folder images once
    # model: a pixel-space DiT
    patch: int = 4  # patch size; every scale must be divisible by it
    hidden: int = 128  # token width
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP width over token width
    sigma_data: float = 0.5  # data std of the EDM-style preconditioning; 0 turns it off
    feat_block: int = 2  # block whose tokens feed the GAN head and the patch loss (1-based)
    # schedule (SwD section 3)
    scales: list = field(default_factory=lambda: [8, 16, 24, 32])  # resolution of each step, rising
    levels: list = field(default_factory=lambda: [1.0, 0.9, 0.75, 0.6])  # noise level of each step
    schedule: str = "hand"  # hand: use --levels | auto: derive them from the data's spectrum
    schedule_margin: float = 4.0  # auto: noise power over signal above the previous scale's Nyquist
    # teacher: rectified flow at every scale
    teacher_steps: int = 1250  # optimiser steps
    batch: int = 64  # images per teacher step (global, over all ranks)
    accum: int = 1  # micro-batches per optimiser step, teacher and distillation (memory)
    lr: float = 2e-3  # AdamW learning rate: linear warm-up, then cosine decay to lr / 10
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay of the teacher
    grad_clip: float = 1.0  # gradient-norm clip of the teacher
    ema: float = 0.995  # EMA decay of the teacher weights used for sampling
    logit_mean: float = 0.0  # noise levels s = sigmoid(N(logit_mean, logit_std)), as in SD3
    logit_std: float = 1.0  # spread of that logit-normal distribution
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    teacher_target: str = "sample"  # sample: flow matching | exact: the toy world's velocity
    # distillation (SwD sections 4-6)
    teacher: str = ""  # real score: a teacher.pt ("" = <out_dir>/teacher.pt) or toy (exact)
    real: str = "data"  # real images for the GAN, patch loss and inputs: data | teacher (samples)
    real_n: int = 4096  # --real teacher: teacher samples drawn once and cached in out_dir
    distill_steps: int = 300  # generator updates
    distill_batch: int = 64  # images per generator and per fake update (global)
    distill_lr: float = 1e-4  # AdamW learning rate of the generator
    fake_lr: float = 0.0  # AdamW learning rate of the fake network and GAN head; 0 = distill_lr
    distill_warmup: int = 0  # linear warm-up steps of both distillation learning rates
    distill_decay: bool = False  # cosine decay of the generator's lr to a tenth over distill_steps
    fake_updates: int = 5  # fake-network updates per generator update (two time-scale rule)
    train_first: bool = True  # distil step 1 (noise -> the coarsest scale) too; false: steps 2..K
    fake: str = "residual"  # fake score: residual (real + correction) | copy (DMD2) | fitted (toy)
    fake_loss: str = "x0"  # weight of the fake network's x0-MSE per level: x0 | eps | edm | v
    inputs: str = "data"  # generator inputs: data (SwD: noised real images) | backward (DMD2)
    cfg: float = 1.0  # guidance scale of the real score (1 = none; SD3.5-M used 7)
    dmd_weight: float = 1.0  # weight of the DMD loss
    gan_weight: float = 5e-3  # weight of the generator's GAN loss
    gan_d_weight: float = 1e-2  # weight of the discriminator loss inside the fake-network loss
    mmd_weight: float = 1.0  # weight of the patch MMD loss
    reg_weight: float = 0.0  # DMD1's regression on the first trained step (and step 1's hold)
    reg_n: int = 4096  # --reg_weight: (input, ODE solution) pairs of the real score, cached in out_dir
    mmd_kernel: str = "linear"  # linear (pseudo-Huber on token means) | rbf (official MMD^2)
    mmd_bandwidth: float = 0.0  # RBF bandwidth; 0 = median heuristic (official 100 suits SD3.5)
    mmd_fine: float = 1.0  # factor on the patch pair's parts >= res/4 cycles/image (1: official)
    dmd_levels: list = field(default_factory=lambda: [0.01, 0.79])  # DMD re-noising range
    fake_levels: list = field(default_factory=lambda: [0.01, 1.0])  # fake network's training range
    mmd_levels: list = field(default_factory=lambda: [0.01, 0.6])  # patch-loss feature noise range
    full_res: bool = False  # every step at full resolution: the DMD2 baseline
    # sampling
    ckpt: str = ""  # sample: a teacher.pt or student.pt ("" = the newest in out_dir)
    n: int = 64  # sample: images; a grid up to 256, numbered PNGs and samples.npz above
    labels: str = "all"  # sample: all (every class in turn) | a comma-separated list, cycled
    sample_steps: int = 32  # Euler steps of the teacher sampler
    # logging and measuring
    log_every: int = 25  # steps between log.jsonl lines (and non-finite checks)
    ckpt_every: int = 0  # steps between checkpoints (0 = at sample_every and at the end)
    sample_every: int = 500  # steps between sample grids and checkpoints (0 = at the end)
    eval_every: int = 0  # steps between learning-curve rows in log.jsonl (FD and bands per scale)
    eval_teacher: bool = False  # curve rows for the teacher too (32-step Euler samples: slow)
    probe_every: int = 0  # distill: a fake-network probe of each step every N (fake_probe.jsonl)
    eval_every_n: int = 2000  # samples per learning-curve row
    eval_n: int = 2000  # samples per row of --stage eval (--fid on cifar10: 50000)
    eval_ref: int = 0  # reference images per eval row; 0 means eval_n
    fid: bool = False  # add FID (torch-fidelity); cifar10: FID-50k against the training set
    fid_weights: str = ""  # a local Inception weights file for torch-fidelity (offline)
    eval_batch: int = 500  # images per sampling call in eval and learning curves
    bench_n: int = 256  # images per timed sampling batch in bench
    bench_repeats: int = 5  # timed repeats per bench number, after a warm-up (median); 0: untimed


# CPU presets: the toy world at 32 px in minutes on a laptop; levels end at 0.25 (the last step
# must invent what its noise hides, and at SD3.5's 0.6 that is most of a 32 px image's texture).
CPU_SIZE = dict(hidden=96, teacher_steps=2500, distill_steps=250, distill_batch=32,
                levels=[1.0, 0.75, 0.5, 0.25], distill_lr=1e-4, train_first=False, eval_every=125,
                sample_every=1000, eval_batch=128)  # 128 images per call: a CPU's caches stay warm
PRESETS = {
    # seconds: for tests
    "smoke": dict(hidden=32, depth=2, heads=2, feat_block=1, teacher_steps=6, batch=8, warmup=2,
                  distill_steps=2, distill_batch=4, log_every=1, sample_every=0, sample_steps=2,
                  n=8, eval_n=64, eval_every_n=64, real_n=16),
    # the default: the toy world on a laptop CPU
    "toy": dict(CPU_SIZE, reg_weight=1.0, distill_decay=True),
    # Fashion-MNIST padded to 32 px, grayscale, at the same CPU size, unguided (README: why)
    "fmnist": dict(CPU_SIZE, data="fmnist", channels=1, num_classes=10),
    # CIFAR-10 on one GPU
    "cifar10": dict(data="cifar10", num_classes=10, patch=2, hidden=384, depth=12, heads=6,
                    feat_block=6, teacher_steps=100000, batch=256, lr=3e-4, warmup=2000,
                    ema=0.9999, distill_steps=5000, distill_lr=2e-5, cfg=2.0, sample_every=5000),
    # ImageNet 64x64 for a few GPUs: DiT-B/4 sized (256 tokens at 64 px); DMD2's lr 2e-6
    "imagenet64": dict(data="imagenet64", res=64, num_classes=1000, patch=4, hidden=768, depth=12,
                       heads=12, feat_block=6, scales=[16, 32, 48, 64],
                       levels=[1.0, 0.75, 0.5, 0.25], teacher_steps=400000, batch=512, lr=1e-4,
                       warmup=5000, ema=0.9999, distill_steps=20000, distill_batch=256,
                       distill_lr=2e-6, cfg=1.5, sample_every=10000, ckpt_every=2000),
}


# ------------------------------------------------------------------------------------------
#                                            Data
# ------------------------------------------------------------------------------------------


TOY_WORLDS = {}  # (res, num_classes, channels) -> ToyTeacher


def toy_world(c):
    """The toy world of c's size (toy_teacher.ToyTeacher), made once per process: the data, the
    exact real score and the learning curve share it and its per-scale cache."""
    key = (c.res, c.num_classes, c.channels)
    if key not in TOY_WORLDS:
        from toy_teacher import ToyTeacher
        TOY_WORLDS[key] = ToyTeacher(res=c.res, num_classes=c.num_classes, channels=c.channels)
    return TOY_WORLDS[key]


class Data:
    """Infinite source of batches (x in [-1, 1] (B, C, res, res), y (B,)) on the device: the toy
    world drawn on the fly, a dataset held as uint8 (on the device when it is small), or given
    images (--real teacher: a bank of teacher samples). The file readers are plumbing, below."""

    def __init__(self, c, device, images=None):
        self.device, self.toy = device, None
        self.flip = c.flip == "true" or (c.flip == "auto" and c.data in ("cifar10", "imagenet64",
                                                                          "folder"))
        if images is None and c.data == "toy":
            self.toy = toy_world(c)
            return
        self.x, self.y = images if images is not None else load_dataset(c)
        if isinstance(self.x, torch.Tensor) and self.x.numel() * self.x.element_size() < 2 ** 31:
            self.x, self.y = self.x.to(device), self.y.to(device)  # lives there: no copies later
        self.at = self.x.device if isinstance(self.x, torch.Tensor) else torch.device("cpu")

    def batch(self, n, generator=None):
        """n images and labels; generator: a CPU torch.Generator for a reproducible draw."""
        if self.toy is not None:
            x, y = self.toy.sample(n, generator=generator)
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        at = self.at if generator is None else torch.device("cpu")
        i = torch.randint(len(self.y), (n,), generator=generator, device=at).to(self.at)
        x = torch.as_tensor(self.x[i] if isinstance(self.x, torch.Tensor) else self.x[i.numpy()])
        if x.dtype == torch.uint8:
            x = x.to(self.device, non_blocking=True).float() / 127.5 - 1
        x, y = x.to(self.device, non_blocking=True), self.y[i].to(self.device, non_blocking=True)
        if self.flip:  # mirror a random half of the batch left-right; labels stay
            mirror = torch.rand(n, generator=generator, device=at).to(self.device) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x, y


# ------------------------------------------------------------------------------------------
#              Spectral maths: why noisy steps need few pixels (SwD section 2)
# ------------------------------------------------------------------------------------------


def rapsd(x):
    """Radially averaged power spectral density of images x (B, C, H, W), mean over batch, channels.

    P(k) = mean over the ring |k| of |FFT(x)(k)|^2 / (H W), so white noise of variance v is flat at
    v. Returns (frequencies in cycles per pixel, 1/H .. 0.5, power (H/2,)), rings of width 1/H, DC
    excluded; square images.
    """
    H = x.shape[-1]
    power = (torch.fft.fft2(x.double(), norm="ortho").abs() ** 2).mean((0, 1))  # (H, W)
    k = torch.fft.fftfreq(H, device=x.device) * H
    ring = (k[:, None] ** 2 + k[None, :] ** 2).sqrt().round().long().reshape(-1)  # (H W,)
    total = torch.zeros(int(ring.max()) + 1, dtype=power.dtype, device=x.device)
    total.index_add_(0, ring, power.reshape(-1))
    count = torch.bincount(ring).to(power.dtype)
    rings = torch.arange(1, H // 2 + 1, device=x.device)
    return rings.double() / H, total[rings] / count[rings]


def crossover(freqs, power, s):
    """k*(s): the frequency where the signal (1-s)^2 P(k) falls to the noise s^2 (SwD section 2).

    Interpolated in log-log between rings; freqs[-1] (Nyquist) if the signal never falls below the
    noise, freqs[0] if it is below everywhere. Assumes P falls with k, as images' spectra do.
    """
    snr = ((1 - s) ** 2 * power / s ** 2).log()  # > 0: signal above noise
    below = (snr < 0).nonzero()
    if len(below) == 0:
        return freqs[-1].item()
    j = below[0].item()
    if j == 0:
        return freqs[0].item()
    lf = freqs.log()
    t = snr[j - 1] / (snr[j - 1] - snr[j])  # where the log-SNR crosses zero
    return (lf[j - 1] + t * (lf[j] - lf[j - 1])).exp().item()


def power_law_fit(freqs, power):
    """Least-squares line log P = slope log k + intercept: (slope, intercept); ~ -2 for photos."""
    A = torch.stack([freqs.log(), torch.ones_like(freqs)], 1)
    slope, intercept = torch.linalg.lstsq(A, power.log()[:, None]).solution[:, 0].tolist()
    return slope, intercept


def auto_schedule(freqs, power, scales, margin=4.0):
    """Noise levels for a scale-wise schedule from the data's RAPSD at full resolution (ours).

    Step i runs at r_i on an input upsampled from r_{i-1}, which holds nothing above r_{i-1}'s
    Nyquist f = r_{i-1} / (2 R) (cycles per full-resolution pixel). That input is a faithful x_t at
    r_i only if everything above f is drowned: (1-s)^2 P_i(k) <= s^2 / margin for k > f, with
    P_i = P (r_i / R)^2 the spectrum after area down-sampling. Hence s_i = q / (1 + q), q =
    sqrt(margin max_{k>f} P_i(k)); s_1 = 1. Levels may not rise, so each s_i is raised to the
    largest level a later step needs.
    """
    R = scales[-1]
    levels = [1.0]
    for prev, r in zip(scales, scales[1:]):
        q = (margin * power[freqs > prev / (2 * R)].max().item() * (r / R) ** 2) ** 0.5
        levels.append(q / (1 + q))
    for i in range(len(levels) - 2, 0, -1):  # never rising: s_i >= s_{i+1}
        levels[i] = max(levels[i], levels[i + 1])
    return levels


# ------------------------------------------------------------------------------------------
#     Scales: the scale-wise sampler (SwD section 3) and its training inputs (section 4)
# ------------------------------------------------------------------------------------------


def downsample(x, r):
    """Area down-sampling to r x r (SwD: data is always area-downsampled)."""
    return x if x.shape[-1] == r else F.interpolate(x, size=(r, r), mode="area")


def upsample(x, r):
    """Bicubic up-sampling to r x r (SwD's "fix upscale": nearest aliases)."""
    if x.shape[-1] == r:
        return x
    return F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False)


def lowpass(x, cutoff):
    """x (B, C, r, r) with every Fourier component of radius >= cutoff cycles/image removed."""
    r = x.shape[-1]
    k = torch.fft.fftfreq(r, device=x.device) * r
    keep = (k[:, None] ** 2 + k[None, : r // 2 + 1].abs() ** 2).sqrt() < cutoff  # (r, r/2+1)
    return torch.fft.irfft2(torch.fft.rfft2(x.float()) * keep, s=(r, r)).to(x.dtype)


def noised(x0, s, eps):
    """x_t = (1 - s) x0 + s eps; s a float or (B,)."""
    s = s.reshape(-1, 1, 1, 1) if isinstance(s, torch.Tensor) else s
    return (1 - s) * x0 + s * eps


def to_x0(x_t, s, v):
    """x0_hat = x_t - s v: the clean image a velocity v predicts; s a float or (B,)."""
    s = s.reshape(-1, 1, 1, 1) if isinstance(s, torch.Tensor) else s
    return x_t - s * v


@torch.no_grad()
def scale_wise_sample(denoise, noise, scales, levels, generator=None, return_trajectory=False):
    """Scale-wise sampling (SwD section 3, Algorithm 1): denoise(x, s) -> x0_hat at x's resolution.

    noise: (B, C, r_1, r_1) standard normal; scales r_1 < ... < r_K; levels s_1 = 1 > ... > s_K.
    With all scales equal this is the full-resolution few-step (DMD2) sampler. Returns x0_hat
    (B, C, r_K, r_K), and with return_trajectory every step's x0_hat.
    """
    x, traj = noise, []  # s_1 = 1: the first step's input is pure noise at r_1
    for i, s in enumerate(levels):
        x0_hat = denoise(x, s)  # 1. one generator call at resolution r_i
        traj.append(x0_hat)
        if i + 1 < len(scales):
            r = scales[i + 1]  # 2. upsample the *clean* prediction (bicubic) to r_{i+1}
            up = x0_hat if x0_hat.shape[-1] == r else F.interpolate(
                x0_hat, size=(r, r), mode="bicubic", align_corners=False)
            eps = torch.randn_like(up) if generator is None else torch.randn(  # 3. fresh noise
                up.shape, generator=generator, device=generator.device).to(up)  # at r_{i+1}
            x = (1 - levels[i + 1]) * up + levels[i + 1] * eps  # 4. re-noise to s_{i+1}
    return (x0_hat, traj) if return_trajectory else x0_hat


def scale_wise_inputs(x, i, scales, levels, eps=None):
    """Generator training pair for step i (SwD section 4), from real images x (B, C, R, R).

    target x_i = down(x, r_i); input: the previous scale up(down(x, r_{i-1}), r_i) noised at s_i,
    as scale_wise_sample would feed it. Returns (x_t, target), both (B, C, r_i, r_i).
    """
    def resize(z, r, mode):  # area down, bicubic up; the identity at the same size
        kw = dict(align_corners=False) if mode == "bicubic" else {}
        return z if z.shape[-1] == r else F.interpolate(z, size=(r, r), mode=mode, **kw)

    target = resize(x, scales[i], "area")
    prev = target if i == 0 else resize(resize(x, scales[i - 1], "area"), scales[i], "bicubic")
    eps = torch.randn_like(target) if eps is None else eps
    return (1 - levels[i]) * prev + levels[i] * eps, target


# ------------------------------------------------------------------------------------------
#                                  Model: a pixel-space DiT
# ------------------------------------------------------------------------------------------


def precondition(s, sigma_data):
    """c_in, c_skip, c_out, each (B, 1, 1, 1), for v_theta = c_skip x_t + c_out F(c_in x_t, s).

    EDM's preconditioning (Karras et al. 2022, section 5, table 1), rederived for x_t = (1-s) x0 +
    s eps, target v = eps - x0, per-pixel data std sd: Var(x_t) = (1-s)^2 sd^2 + s^2; c_in =
    Var^-1/2 (unit input); c_skip = Cov(v, x_t) / Var = (s - (1-s) sd^2) / Var (the best linear
    guess of v); c_out = sd Var^-1/2, so F's target has unit variance. The network no longer has to
    copy x_t through its layers, which a small DiT does poorly.
    """
    s = s.reshape(-1, 1, 1, 1)
    var = (1 - s) ** 2 * sigma_data ** 2 + s ** 2
    return var.rsqrt(), (s - (1 - s) * sigma_data ** 2) / var, sigma_data * var.rsqrt()


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C) tokens, row-major over the patch grid."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return t.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(t, p, C, H, W):
    """The inverse of patchify: (B, N, p*p*C) -> (B, C, H, W)."""
    B = t.shape[0]
    x = t.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, C, H, W)


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the condition sets shift, scale and gate of each half,
    mod = ada(cond). The block holds ada's weights; DiT.modulation applies every block's at once."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"),
                                 nn.Linear(width, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, mod):  # x (B, N, D), mod (B, 6 D): self.ada(cond)
        B, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, -1)
        qkv = self.qkv(self.norm1(x) * (1 + scale1) + shift1)  # (B, N, 3 D)
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Pixel DiT: patchify -> adaLN-Zero blocks on (level, class) -> velocity, at any scale."""

    def __init__(self, res, channels, patch, hidden, depth, heads, mlp_ratio, num_classes,
                 sigma_data=0.0):
        super().__init__()
        self.res, self.channels, self.patch, self.hidden = res, channels, patch, hidden
        self.num_classes, self.sigma_data = num_classes, sigma_data  # sigma_data 0: no precondition
        self.patch_in = nn.Linear(channels * patch * patch, hidden)  # a stride-p conv as a reshape
        self.s_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # the last row is the CFG null class
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch * patch * channels)
        self.pos = {}  # token grid side -> position embedding, made once per scale
        for m in self.modules():  # xavier everywhere, then adaLN-Zero: modulation and output at 0
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [b.ada[-1] for b in self.blocks] + [self.ada_out[-1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)

    @classmethod
    def from_config(cls, c):
        return cls(c.res, c.channels, c.patch, c.hidden, c.depth, c.heads, c.mlp_ratio,
                   c.num_classes, c.sigma_data)

    @staticmethod
    def timestep_embedding(s, dim, max_period=10000.0):
        """Sinusoidal embedding (B, dim) of noise levels s (B,), scaled to [0, 1000] as in DiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device) / half)
        args = 1000 * s.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], -1)

    @staticmethod
    def pos_embedding_2d(n, dim, base, device):
        """Sin-cos position embedding (n*n, dim) for an n x n token grid, relative to the image: a
        token's coordinate is (index + 0.5) / n * base, base = tokens per side at full resolution,
        so the token covering a given part of the image gets the same embedding at every scale."""
        coord = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * base
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4))
        gy, gx = torch.meshgrid(coord, coord, indexing="ij")
        ay, ax = gy.reshape(-1, 1) * omega, gx.reshape(-1, 1) * omega
        return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], -1)

    def embed(self, x, s, y):
        """Tokens (B, N, D), condition (B, D), and precondition's (c_skip, c_out) or None.
        s: (B,) levels, or one float for the whole batch."""
        if not isinstance(s, torch.Tensor):
            s = torch.full((x.shape[0],), s, device=x.device)  # a fill on the device, no copy
        pre = precondition(s.float(), self.sigma_data) if self.sigma_data else None
        n = x.shape[-1] // self.patch
        compiling = torch.compiler.is_compiling()  # compiled code folds pos into its graph
        pos = None if compiling else self.pos.get((n, x.device))  # and never reads the cache: a
        if pos is None:  # guard on it would recompile every graph once the cache fills
            pos = self.pos_embedding_2d(n, self.hidden, self.res // self.patch, x.device)
            if not compiling:
                self.pos[(n, x.device)] = pos
        cond = self.s_embed(self.timestep_embedding(s, 256)) + self.y_embed(y)
        tokens = self.patch_in(patchify(x * pre[0] if pre else x, self.patch)) + pos  # (B, N, D)
        return tokens, cond, pre

    def forward(self, x, s, y, feat_block=None, rows=None, skip=True):
        """Velocity (B, C, H, W); with feat_block=k also the tokens (B, N, D) after block k.
        rows=n: the tokens of all B images, the velocity of the first n only (one call where SwD
        needs the tokens of generated and real images but the score of the generated ones).
        skip=False: c_out F alone, without c_skip x_t (the residual fake score's correction)."""
        B, C, H, W = x.shape
        h, cond, pre = self.embed(x, s, y)
        mods, feats = self.modulation(cond), None
        for i, block in enumerate(self.blocks, 1):
            h = block(h, mods[i - 1])
            if i == feat_block:
                feats = h
                if rows is not None:  # the blocks after k run for the first rows images alone
                    h, cond, x, mods = h[:rows], cond[:rows], x[:rows], mods[:, :rows]
                    pre = pre and tuple(p[:rows] for p in pre)
        shift, scale = self.ada_out(cond)[:, None].chunk(2, -1)
        v = unpatchify(self.out(self.norm_out(h) * (1 + scale) + shift), self.patch, C, H, W)
        if pre:  # v = c_skip x_t + c_out F: the network predicts only what x_t does not explain
            v = pre[1] * x + pre[2] * v if skip else pre[2] * v
        return v if feat_block is None else (v, feats)

    def features(self, x, s, y, k):
        """Tokens (B, N, D) after block k only: the blocks after k are not run."""
        h, cond, _ = self.embed(x, s, y)
        for block, mod in zip(self.blocks[:k], self.modulation(cond, k)):
            h = block(h, mod)
        return h

    def modulation(self, cond, k=None):
        """Each of the first k blocks' ada(cond) (k=None: every block), (k, B, 6 D): one matmul of
        their stacked weights, equal to k separate calls to rounding, with one matmul launch (and
        two for its gradients) per network call in place of k."""
        ada = [b.ada[-1] for b in self.blocks[:k]]
        mods = F.linear(F.silu(cond), torch.cat([m.weight for m in ada]),
                        torch.cat([m.bias for m in ada]))  # (B, k 6 D)
        return mods.unflatten(-1, (len(ada), -1)).transpose(0, 1)


# ------------------------------------------------------------------------------------------
#                      Teacher: rectified flow, trained at every scale
# ------------------------------------------------------------------------------------------


def flow_matching_loss(model, x0, y, s, eps):
    """Rectified flow: || v_theta(x_t, s, y) - (eps - x0) ||^2, x_t = (1-s) x0 + s eps."""
    return F.mse_loss(model(noised(x0, s, eps), s, y), eps - x0)


def lr_at(step, warmup, total, base):
    """Linear warm-up, then cosine decay to base/10."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- ema + (1 - decay) (model - ema), every parameter in one call (after a step the guard
    skipped, the model is unchanged and finite, so the EMA is too)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def update(opt, params, clip, guard, step, **terms):
    """One optimiser step after the backward passes: gradients averaged over the ranks (torchrun),
    clipped, checked on the device with the loss terms (guard), applied unless something is not
    finite. Returns (the terms averaged over the ranks, 1.0 if the step was skipped else 0.0)."""
    terms = dict(zip(terms, DIST.average(params, *terms.values())))
    norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    found_inf = guard(step, **terms, grad_norm=norm)
    if opt.defaults.get("fused"):  # the fused AdamW skips the step on the device if found_inf
        opt.found_inf = found_inf
        opt.step()
    elif not found_inf.item():  # another optimiser: a host read decides
        opt.step()
    opt.zero_grad(set_to_none=True)
    return terms, found_inf


def micro_batches(n, accum):
    """[(slice, its share of the batch)] of a batch of n in accum micro-batches (--accum: one
    optimiser step in several passes, for less memory)."""
    size = -(-n // accum)
    return [(slice(j, min(n, j + size)), (min(n, j + size) - j) / n) for j in range(0, n, size)]


def teacher_step(step, fwd, model, ema, opt, data, c, guard):
    """One teacher update: a batch at scale r = scales[step % K], rectified flow at levels s ~
    logit-normal, AdamW, EMA. fwd is the model or its compiled twin. Returns (loss, r), no sync."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, c.warmup, c.teacher_steps, c.lr)
    r, B, dev = c.scales[step % len(c.scales)], c.batch, data.device
    x, y = data.batch(B)  # the global batch and its draws; under torchrun each rank keeps a slice
    x0 = downsample(x, r)
    s = torch.normal(c.logit_mean, c.logit_std, (B,), device=dev).sigmoid()  # as in SD3
    eps = torch.randn_like(x0)
    y = y.masked_fill(torch.rand(B, device=dev) < c.class_dropout, c.num_classes)  # CFG: null
    x0, y, s, eps = DIST.local(x0, y, s, eps)
    if c.teacher_target == "exact":  # the toy world's exact velocity: flow matching's minimiser
        x_t = noised(x0, s, eps)
        target = data.toy.velocity(x_t.cpu().double(), s.cpu(), y.cpu()).float().to(dev)
    total = 0.0
    for mb, frac in micro_batches(len(x0), c.accum):
        with autocast(dev, c.precision):
            if c.teacher_target == "exact":
                loss = F.mse_loss(fwd(x_t[mb], s[mb], y[mb]), target[mb])
            else:
                loss = flow_matching_loss(fwd, x0[mb], y[mb], s[mb], eps[mb])
        (loss * frac if frac < 1 else loss).backward()
        total = total + loss.detach() * frac if frac < 1 else loss.detach()
    terms, _ = update(opt, list(model.parameters()), c.grad_clip, guard, step, loss=total)
    ema_update(ema, model, c.ema)
    return terms["loss"], r


# ------------------------------------------------------------------------------------------
#     Distillation (SwD sections 5-6): DMD with a fake score, a GAN head, the patch loss
# ------------------------------------------------------------------------------------------
# The losses first, each a pure function; then the two halves of one iteration.


def dmd_loss(x0_hat, mu_real, mu_fake):
    """DMD generator loss (Yin et al. 2024, eq. 7; SwD section 5); all images (B, C, H, W).

    x0_hat: the generator's output; mu_real, mu_fake: the real and fake scores' x0 estimates from
    x0_hat re-noised. p_real = x0_hat - mu_real, p_fake = x0_hat - mu_fake, and
    g = (p_real - p_fake) / mean_CHW |p_real| per sample. loss = 0.5 mse(x0_hat, sg(x0_hat - g)),
    so d loss / d x0_hat = g / numel: no weight per noise level, as in SwD and DMD2.
    """
    p_real, p_fake = x0_hat - mu_real, x0_hat - mu_fake
    norm = p_real.abs().mean((1, 2, 3), keepdim=True)
    g = torch.nan_to_num((p_real - p_fake) / norm).detach()
    return 0.5 * F.mse_loss(x0_hat, (x0_hat - g).detach())


def gan_generator_loss(logits_fake):
    """Non-saturating generator loss softplus(-D(fake)) (DMD2, section 4.2)."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator_loss(logits_real, logits_fake):
    """softplus(D(fake)) + softplus(-D(real)) (DMD2, section 4.2)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def patch_mmd(feat_fake, feat_real, kernel="linear", bandwidth=0.0, pooled=False, c=1e-3):
    """Patch distribution matching (SwD section 6): MMD between token features of fake and real.

    feat_fake, feat_real: (B, N, D) tokens of generated image b and of *its own* real target b,
    from the same network and block, noised with the same eps at the same level. Per image
    (default) the N tokens of image b form one sample set; pooled=True makes one set of B*N tokens.
      linear: MMD with k(a, b) = a.b is |mean(a) - mean(b)|^2; SwD applies a pseudo-Huber
              sqrt(d^2 + c^2) - c to each feature's mean difference d and averages;
      rbf:    MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 bw^2)), as the official code computes it:
              within-set sums without the diagonal over N(N-1), the cross sum over all N^2 pairs.
              bandwidth <= 0: the median heuristic, bw = median token distance (per call).
    Returns a scalar, averaged over images.
    """
    if pooled:  # (B, N, D) -> (1, B*N, D)
        feat_fake, feat_real = feat_fake.flatten(0, 1)[None], feat_real.flatten(0, 1)[None]
    if kernel == "linear":
        d = feat_fake.mean(1) - feat_real.mean(1)  # (B, D)
        return ((d ** 2 + c ** 2).sqrt() - c).mean()
    n = feat_fake.shape[1]
    d_xx = torch.cdist(feat_fake, feat_fake) ** 2  # (B, N, N) squared distances
    d_yy, d_xy = torch.cdist(feat_real, feat_real) ** 2, torch.cdist(feat_fake, feat_real) ** 2
    bw = bandwidth
    if bw <= 0:  # median over all pairs of both sets, no gradient through the bandwidth
        bw = torch.cat([d_xx, d_yy, d_xy], -1).detach().median().clamp(min=1e-12).sqrt()
    k_xx, k_yy, k_xy = (torch.exp(-d / (2 * bw ** 2)) for d in (d_xx, d_yy, d_xy))
    xx = (k_xx.sum((1, 2)) - n) / (n * (n - 1))  # k(a, a) = 1 on the diagonal
    yy = (k_yy.sum((1, 2)) - n) / (n * (n - 1))
    xy = k_xy.sum((1, 2)) / (n * n)
    return (xx + yy - 2 * xy).mean()


class GANHead(nn.Module):
    """Discriminator on the fake network's block-k tokens: token mean, 4 x [LN, GELU, Linear]."""

    def __init__(self, hidden):
        super().__init__()
        dims = [hidden, hidden // 2, hidden // 4, hidden // 8, 1]
        self.net = nn.Sequential(*[nn.Sequential(nn.LayerNorm(a), nn.GELU(), nn.Linear(a, b))
                                   for a, b in zip(dims, dims[1:])])

    def forward(self, tokens):  # (B, N, D) -> (B,)
        return self.net(tokens.mean(1))[:, 0]


def guided_velocity(model, x, s, y, w, conditional=False):
    """Classifier-free guidance v_u + w (v_c - v_u), both halves in one batched call; w = 1 is the
    conditional model alone. conditional=True: (guided, v_c)."""
    if w == 1.0:
        v = model(x, s, y)
        return (v, v) if conditional else v
    s2 = torch.cat([s, s]) if isinstance(s, torch.Tensor) else s
    v_c, v_u = model(torch.cat([x, x]), s2, torch.cat([y, torch.full_like(y, model.num_classes)])
                     ).chunk(2)
    return (v_u + w * (v_c - v_u), v_c) if conditional else v_u + w * (v_c - v_u)


def fake_loss_weight(s, kind, sigma_data=0.5):
    """Weight per noise level s (B,) of the fake network's x0-MSE (a denoising loss of G's samples):
    x0: 1 (SwD); eps: ((1-s)/s)^2, the eps-MSE (DMD2 on SD); edm: ((1-s)/s)^2 + 1/sigma_data^2,
    EDM's weighting at sigma = s/(1-s) (DMD2 on ImageNet); v: 1/s^2, the teacher's flow loss."""
    s = s.clamp(min=1e-3)
    return {"x0": torch.ones_like(s), "eps": ((1 - s) / s) ** 2, "v": s ** -2,
            "edm": ((1 - s) / s) ** 2 + sigma_data ** -2}[kind]


@dataclass
class Student:
    """What distillation trains (SwD section 5), each network copied from the start network."""
    gen: nn.Module  # the few-step generator G: x_t at scale r_i -> velocity; what sampling uses
    fake: nn.Module  # the fake score: a denoiser of G's own samples, trained alongside
    head: nn.Module  # GAN discriminator head on the fake network's block tokens
    opt_gen: torch.optim.Optimizer  # AdamW of G
    opt_fake: torch.optim.Optimizer  # AdamW of the fake network and the head

    @classmethod
    def start(cls, c, device, init):
        """Generator and fake network (copies of init) and a fresh GAN head, with their
        optimisers (SwD's AdamW: betas (0.9, 0.999), weight decay 1e-2). --fake residual (and
        fitted): the fake network's output layer starts at zero, so the fake score starts as the
        real one."""
        gen, fake = (copy.deepcopy(init).train().requires_grad_(True) for _ in range(2))
        if c.fake != "copy":
            nn.init.zeros_(fake.out.weight)
            nn.init.zeros_(fake.out.bias)
        head = GANHead(c.hidden).to(device)
        adamw = dict(betas=(0.9, 0.999), weight_decay=1e-2, fused=True)
        return cls(gen=gen, fake=fake, head=head,
                   opt_gen=torch.optim.AdamW(gen.parameters(), lr=c.distill_lr, **adamw),
                   opt_fake=torch.optim.AdamW([*fake.parameters(), *head.parameters()],
                                              lr=c.fake_lr or c.distill_lr, **adamw))

    def state(self):
        """Everything a checkpoint keeps, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def step_scales(c, full_res=None):
    """Resolution of each sampling step: c.scales, or the full resolution K times (DMD2)."""
    full = c.full_res if full_res is None else full_res
    return [c.res] * len(c.scales) if full else c.scales


def trained_steps(c):
    """The step indices distillation cycles over: all K, or with --train_first false 1..K-1 (a
    single step is always trained). Step 0 turns a class mean into samples, the largest update of
    all, and through the shared weights it blurs the later steps (README, "Convergence")."""
    K = len(c.scales)
    return [i for i in range(K) if i or c.train_first or K == 1]


def generator_inputs(gen, x, y, i, c):
    """G's training input at step i and its real target, both (B, C, r_i, r_i), from real images x:
    SwD's noised down-and-up-sampled x (scale_wise_inputs), or with --inputs backward DMD2's
    backward simulation: G's own steps 1..i-1 from fresh noise (no gradient), re-noised at s_i."""
    scales = step_scales(c)
    if c.inputs == "data":
        return scale_wise_inputs(x, i, scales, c.levels)
    target = downsample(x, scales[i])
    if i == 0:
        return torch.randn_like(target), target
    noise = torch.randn(len(x), c.channels, scales[0], scales[0], device=x.device)
    with torch.no_grad(), autocast(x.device, c.precision):
        x0 = scale_wise_sample(lambda z, s: to_x0(z, s, gen(z, s, y)).float(), noise, scales[:i],
                               c.levels[:i])
    return noised(upsample(x0, scales[i]), c.levels[i], torch.randn_like(target)), target


def fake_score(fake, v_real, x, s, y, c, **tokens):
    """The fake score's velocity at x (and the fake network's tokens, with feat_block=k). --fake
    residual: the frozen real score's conditional v_real plus the network's correction c_out F,
    zero at the start, as in SwD, whose fake score is the teacher with LoRA adapters and whose
    real score is the same network with them off; --fake copy: the network itself (DMD2);
    --fake fitted: residual, but at full resolution DMD uses toy.fitted (generator_losses)."""
    out = fake(x, s, y, skip=c.fake == "copy", **tokens)
    v, feats = out if tokens else (out, None)
    v = v + v_real.to(v.dtype) if c.fake != "copy" else v
    return (v, feats) if tokens else v


def fake_losses(fake, head, v_real, x0_g, target, y, s, eps, c):
    """The fake network's and the discriminator's losses on one batch of G's samples x0_g
    (B, C, r, r), with their real targets, noised alike at s (B,) with eps:
        L_fake = mean_b w(s_b) || x0_fake(x_s) - x0_g ||^2   (w: fake_loss_weight),
        L_D    = softplus(D(tokens of x_s)) + softplus(-D(tokens of the noised target)) (DMD2).
    v_real: the frozen real score's velocity at x_s (--fake residual), else None.
    Returns (L_fake, L_D)."""
    x_s, b = noised(x0_g, s, eps), len(x0_g)
    if c.gan_weight > 0:  # one call: the tokens of both, the score of the generated images
        v, feats = fake_score(fake, v_real, torch.cat([x_s, noised(target, s, eps)]),
                              torch.cat([s, s]), torch.cat([y, y]), c, feat_block=c.feat_block,
                              rows=b)
    else:
        v = fake_score(fake, v_real, x_s, s, y, c)
    err = (to_x0(x_s, s, v).float() - x0_g).pow(2).mean((1, 2, 3))  # (B,)
    loss_fake = (fake_loss_weight(s, c.fake_loss, c.sigma_data or 0.5) * err).mean()
    if c.gan_weight == 0:
        return loss_fake, torch.zeros((), device=x0_g.device)
    logits_fake, logits_real = head(feats).chunk(2)
    return loss_fake, gan_discriminator_loss(logits_real, logits_fake)


def generator_losses(x0_hat, target, y, real, fake, head, s_d, eps_d, s_m, eps_m, c):
    """SwD's generator loss terms (its generator_loss) for G's output x0_hat (B, C, r, r), which
    carries the gradient, and its real target; the fake network and head are frozen:
        dmd: dmd_loss at x_d = x0_hat re-noised at s_d (the real score guided by --cfg; --fake
             fitted, a diagnostic on the toy world: at full resolution the fake x0 estimate is
             that of the world with x0_hat's texture spectrum, the fake network's limit removed),
        gan: softplus(-D(tokens of x_d)) (DMD2), the gradient flowing through the fake network,
        mmd: patch_mmd(tokens of x0_hat, tokens of target), both noised at s_m with eps_m
             (--mmd_fine a: both first with their parts >= res/4 cycles per image times a).
    Returns {name: term}, added with the --<name>_weight flags (a term of weight 0 adds 0)."""
    b, x_d = len(x0_hat), noised(x0_hat, s_d, eps_d)
    x0_m = x0_hat
    if c.mmd_fine != 1:  # the full-resolution finest octave of both, scaled by --mmd_fine
        fine = lambda x: c.mmd_fine * x + (1 - c.mmd_fine) * lowpass(x, c.res / 4)
        x0_m, target = fine(x0_hat), fine(target)
    with torch.no_grad():
        v_real, v_cond = guided_velocity(real, x_d, s_d, y, c.cfg, conditional=True)
        mu_real = to_x0(x_d, s_d, v_real).float()
    # one fake pass: its score at x_d, its tokens of x_d (GAN) and of the patch loss's pair
    v_fake, feats = fake_score(fake, v_cond, torch.cat([x_d, noised(x0_m, s_m, eps_m),
                                                        noised(target, s_m, eps_m)]),
                               torch.cat([s_d, s_m, s_m]), torch.cat([y, y, y]), c,
                               feat_block=c.feat_block, rows=b)
    feat_d, feat_gen, feat_real = feats.float().split(b)
    mu_fake = to_x0(x_d, s_d, v_fake.detach()).float()
    if c.fake == "fitted" and x0_hat.shape[-1] == c.res:  # the fake that knows G's spectrum only
        fit = toy_world(c).fitted(x0_hat.detach().cpu())
        mu_fake = fit.denoise(x_d.detach().cpu().double(), s_d.cpu(), y.cpu()).to(mu_real)
    return dict(dmd=dmd_loss(x0_hat, mu_real, mu_fake),
                gan=gan_generator_loss(head(feat_d)),
                mmd=patch_mmd(feat_gen, feat_real.detach(), c.mmd_kernel, c.mmd_bandwidth))


@torch.no_grad()
def first_step_means(data, c, r, n=16384):
    """What an untrained step 1 should return, (num_classes, C, r, r): at s = 1 the input is pure
    noise, so the exact x0 estimate is the class mean E[x | y] at r (with --cfg w, the guided
    m + w (m_y - m) about the mean m of all classes), over n images of data. An error here is
    shared by every sample of a class, and step 2 picks its modes from it (README,
    "Convergence"), so with --reg_weight and --train_first false G's step 1 is held there."""
    sums = torch.zeros(c.num_classes, c.channels, r, r, device=data.device)
    count = torch.zeros(c.num_classes, device=data.device)
    g = seeded(c.seed + 17)
    for j in range(0, n, 1024):
        x, y = data.batch(min(1024, n - j), g)
        sums.index_add_(0, y, downsample(x, r))
        count += torch.bincount(y, minlength=c.num_classes)
    m_y = sums / count.clamp(min=1).reshape(-1, 1, 1, 1)
    m = sums.sum(0) / count.sum()
    return m + c.cfg * (m_y - m)


def regression_loss(x0_hat, x_ode):
    """DMD1's regression loss (Yin et al. 2024, eq. 9; MSE in place of LPIPS): G's output from an
    input the sampler feeds it (there: pure noise) against the real score's ODE solution from the
    same input. DMD alone says how many samples each mode should get; this says which noise goes
    to which mode, so modes cannot hop. Also the hold: an untrained step 1 against its means."""
    return F.mse_loss(x0_hat, x_ode)


def training_batch(gen, data, c, i, level_ranges, groups=1, pairs=None, first_noise=False):
    """`groups` global batches of --distill_batch for step i, drawn alike on every rank, then this
    rank's slice of each (torchrun: the one place distillation meets the ranks): G's inputs and
    real targets (generator_inputs), labels, a level s ~ U(low, high) per image for each range,
    then the noise of each; with pairs, a batch of them too; with first_noise, pure noise at the
    first scale. Returns [x_in, target, y, s_1, ..., eps_1, ...] (+ [z, y_z, x_ode] or [z])."""
    x, y = data.batch(groups * c.distill_batch)
    x_in, target = generator_inputs(gen, x, y, i, c)
    out = [x_in, target, y] + [torch.empty(len(y), device=x.device).uniform_(*lh)
                               for lh in level_ranges]
    out += [torch.randn_like(target) for _ in level_ranges]
    if pairs is not None:
        j = torch.randint(len(pairs[0]), (groups * c.distill_batch,), device=pairs[0].device)
        out += [t[j] for t in pairs]
    if first_noise:
        r = step_scales(c)[0]
        out.append(torch.randn(len(y), c.channels, r, r, device=x.device))
    return list(DIST.local(*out, groups=groups))


def fake_score_step(student, real, data, c, i, guard, step=0):
    """The fake half of an iteration (DMD2's two time-scale rule): --fake_updates AdamW steps of
    the fake network and the GAN head (fake_losses), each on a fresh batch of G's samples at step i,
    s uniform in --fake_levels. G and the real score are frozen here, so each makes one batched
    call for all the updates.
    Returns (the first L_fake, the last L_fake, the last L_D)."""
    fake, head, U, dev = student.fake, student.head, c.fake_updates, data.device
    fake.requires_grad_(True)
    head.requires_grad_(True)
    x_in, target, y, s, eps = training_batch(student.gen, data, c, i, [c.fake_levels], U)
    with torch.no_grad(), autocast(dev, c.precision):
        x0_g = to_x0(x_in, c.levels[i], student.gen(x_in, c.levels[i], y)).float()
        v_real = real(noised(x0_g, s, eps), s, y) if c.fake != "copy" else None  # frozen too
    params, b, out = [*fake.parameters(), *head.parameters()], len(y) // U, []
    losses = compiled_loss(fake_losses, c)  # one graph with the fake network and the head
    for u in range(U):
        sums = dict(fake=0.0, disc=0.0)
        for mb, frac in micro_batches(b, c.accum):
            j = slice(u * b + mb.start, u * b + mb.stop)
            with autocast(dev, c.precision):
                loss_fake, loss_d = losses(fake, head, None if v_real is None else v_real[j],
                                           x0_g[j], target[j], y[j], s[j], eps[j], c)
            ((loss_fake + c.gan_d_weight * loss_d) * frac).backward()
            sums = dict(fake=sums["fake"] + loss_fake.detach() * frac,
                        disc=sums["disc"] + loss_d.detach() * frac)
        out.append(update(student.opt_fake, params, 10.0, guard, step, **sums)[0])
    return out[0]["fake"], out[-1]["fake"], out[-1]["disc"]


def generator_step(student, real, data, c, i, guard, step=0, pairs=None, means=None):
    """The generator half of an iteration at step i: a fresh batch, SwD's loss (generator_losses)
    over --accum micro-batches, one AdamW step of G. --reg_weight w adds w x regression_loss:
    at the first trained step, on a batch of pairs (x, y, x_ode) (ode_pairs); at every step after
    an untrained step 1, given its means (first_step_means), its hold: G's step 1 on fresh noise
    against the means of its labels. Returns the terms, averaged over the ranks."""
    gen, dev = student.gen, data.device
    student.fake.requires_grad_(False)
    student.head.requires_grad_(False)
    first = i == trained_steps(c)[0]
    hold = means is not None  # given only when step 1 is untrained, so i > 0 here
    batch = training_batch(gen, data, c, i, [c.dmd_levels, c.mmd_levels],
                           pairs=pairs if first else None, first_noise=hold)
    n, sums = len(batch[2]), {}
    losses = compiled_loss(generator_losses, c)  # one graph with the networks it calls
    for mb, frac in micro_batches(n, c.accum):
        x_in, target, y, s_d, s_m, eps_d, eps_m = (t[mb] for t in batch[:7])
        with autocast(dev, c.precision):
            x0_hat = to_x0(x_in, c.levels[i], gen(x_in, c.levels[i], y)).float()
            terms = losses(x0_hat, target, y, real, student.fake, student.head, s_d, eps_d, s_m,
                           eps_m, c)
        sum(w * v * frac for k, v in terms.items() if (w := getattr(c, f"{k}_weight"))).backward()
        sums = {k: sums.get(k, 0.0) + v.detach() * frac for k, v in terms.items()}
    extra = [("reg", i, batch[7:10])] if first and pairs is not None else []
    extra += [("hold", 0, [batch[-1], batch[2], means[batch[2]]])] if hold else []
    for name, k, pair in extra:
        for mb, frac in micro_batches(n, c.accum):
            x, y, x_to = (t[mb] for t in pair)  # G's input at step k, its labels, its target
            with autocast(dev, c.precision):
                x0_hat = to_x0(x, c.levels[k], gen(x, c.levels[k], y)).float()
                term = regression_loss(x0_hat, x_to)
            (c.reg_weight * term * frac).backward()
            sums[name] = sums.get(name, 0.0) + term.detach() * frac
    return update(student.opt_gen, list(gen.parameters()), 10.0, guard, step, **sums)[0]


def set_distill_rates(student, c, step):
    """Both optimisers' learning rates at a distillation step: a linear warm-up of both
    (--distill_warmup), then, with --distill_decay, the generator's cosine decay to a tenth (lr_at);
    the fake network's rate stays."""
    warm = min(1.0, (step + 1) / max(1, c.distill_warmup))
    gen = (lr_at(step, c.distill_warmup, c.distill_steps, c.distill_lr) if c.distill_decay
           else c.distill_lr * warm)
    for opt, lr in ((student.opt_gen, gen), (student.opt_fake, (c.fake_lr or c.distill_lr) * warm)):
        for g in opt.param_groups:
            g["lr"] = lr


def distill_iteration(student, real, data, c, i, guard, step=0, pairs=None, means=None):
    """One SwD iteration at step index i (DMD2 when c.full_res): the fake half, then the
    generator half, at the step's learning rates when they move (set_distill_rates)."""
    if c.distill_warmup or c.distill_decay:
        set_distill_rates(student, c, step)
    fake_first, fake_last, disc = fake_score_step(student, real, data, c, i, guard, step)
    terms = generator_step(student, real, data, c, i, guard, step, pairs, means)
    return dict(terms, fake_first=fake_first, fake=fake_last, disc=disc)


# ------------------------------------------------------------------------------------------
#                                          Samplers
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def euler_sample(velocity, noise, steps, return_trajectory=False, start=1.0):
    """Probability-flow ODE dx/ds = v(x, s) by Euler from s = start (1: noise) to s = 0 (data).

    velocity(x, s) -> v; noise (B, C, H, W): x at s = start. Uniform grid s_i = start (1 - i/steps).
    """
    s = [start * (1 - i / steps) for i in range(steps + 1)]
    x, traj = noise, [noise]
    for i in range(steps):
        v = velocity(x, s[i])  # 1. velocity at the current point
        x = x + (s[i + 1] - s[i]) * v  # 2. step along it to the next noise level
        traj.append(x)
    return (x, traj) if return_trajectory else x


def teacher_sampler(model, c, y, steps=None, generator=None, noise=None, start=1.0):
    """Teacher Euler (--sample_steps) with CFG: images (B, C, R, R) from noise at full resolution.
    generator: a CPU generator for reproducible noise (else the device's own); noise: given
    starting noise (B, C, r, r) at any scale r, or a given x there at level start."""
    if noise is None:
        noise = torch.randn(len(y), c.channels, c.res, c.res, generator=generator).to(y.device) \
            if generator else torch.randn(len(y), c.channels, c.res, c.res, device=y.device)
    with autocast(y.device, c.precision):
        x = euler_sample(lambda x, s: guided_velocity(model, x, s, y, c.cfg), noise,
                         steps or c.sample_steps, start=start)
    return x.float()


def student_sampler(gen, c, y, generator=None, full_res=None, return_trajectory=False):
    """The distilled generator: scale-wise (or full-resolution) few-step sampling, no CFG."""
    r = step_scales(c, full_res)[0]
    noise = torch.randn(len(y), c.channels, r, r, generator=generator).to(y.device) if generator \
        else torch.randn(len(y), c.channels, r, r, device=y.device)
    with autocast(y.device, c.precision):
        return scale_wise_sample(lambda x, s: to_x0(x, s, gen(x, s, y)).float(), noise,
                                 step_scales(c, full_res), c.levels, generator, return_trajectory)


# ------------------------------------------------------------------------------------------
#                                     The training loops
# ------------------------------------------------------------------------------------------


def train_loop(c, kind, total, start, step_fn, nets, sampler, grid, guard, data=None):
    """What the teacher and distillation loops share. step_fn(step) -> ({name: tensor}, res). Every
    --log_every steps: the finite check (the loop's one host read), a log.jsonl row and the bar;
    learning-curve rows every --eval_every steps (against data, the dataset's Data if given);
    grids and checkpoints every --sample_every and --ckpt_every steps, on SIGINT / SIGTERM and
    at the end (<kind>.pt)."""
    from tqdm import tqdm
    path = os.path.join(c.out_dir, f"{kind}.pt")
    log = JsonLog(os.path.join(c.out_dir, "log.jsonl"), append=c.resume or kind == "student")
    curve = LearningCurve(c, log, kind, data)
    bar = tqdm(range(start, total), initial=start, total=total, desc=kind, dynamic_ncols=True,
               disable=DIST.rank > 0)
    t0, stage = time.time(), "teacher" if kind == "teacher" else "distill"
    with StopOnSignal() as stop:
        for step in bar:
            curve(step, sampler)
            row, res = step_fn(step)
            done = step + 1
            if step % c.log_every == 0 or done == total:
                guard.check()
                row = {k: round(v.item(), 5) for k, v in row.items()}
                bar.set_postfix(res=res, **row)
                log.write(stage=stage, step=step, res=res, world_size=DIST.world,
                          seconds=round(time.time() - t0, 2), **row)
            if c.sample_every and done % c.sample_every == 0 and done < total:
                grid(os.path.join(c.out_dir, f"{kind}_{done:06d}.png"))
            checkpoint_if_due(done, total, path, kind, c, nets, stop, guard)
    curve(total, sampler, last=True)
    guard.check()
    save_checkpoint(path, kind, c, total, nets)
    DIST.barrier()  # under torchrun: every rank waits for rank 0's checkpoint
    grid(os.path.join(c.out_dir, f"{kind}_samples.png"))
    print(f"wrote {path} and {os.path.join(c.out_dir, kind + '_samples.png')}")


def train_teacher(c, device):
    """The multi-scale rectified-flow teacher (teacher_step, scales cycled) and its EMA."""
    torch.manual_seed(c.seed)
    data, model = Data(c, device), DiT.from_config(c).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay, fused=True)
    nets, guard, fwd = dict(model=model, ema=ema, opt=opt), Guard(), compiled(model, c)
    start = resume_from(os.path.join(c.out_dir, "teacher.pt"), "teacher", c, nets)

    def step_fn(step):
        loss, r = teacher_step(step, fwd, model, ema, opt, data, c, guard)
        return dict(loss=loss), r

    train_loop(c, "teacher", c.teacher_steps, start, step_fn, nets,
               lambda y, g: [teacher_sampler(ema, c, y.to(device), generator=g)],
               lambda path: save_grid(teacher_sampler(ema, c, grid_labels(64, c, device),
                                                      generator=seeded(c.seed)), path), guard,
               data)
    return ema


def load_real_score(c, device):
    """The frozen real score: the exact toy velocity (--teacher toy) or a teacher's EMA weights."""
    if c.teacher == "toy":
        from toy_teacher import ExactVelocity
        return ExactVelocity(toy_world(c))
    path = c.teacher or os.path.join(c.out_dir, "teacher.pt")
    if not os.path.exists(path):
        raise UserError(f"no teacher at {path}; train one with `python swd_mini.py --stage teacher "
                        f"--preset {c.preset} --out_dir {c.out_dir}` or pass --teacher PATH or toy")
    return model_from_checkpoint(path, device, like=c, kind="teacher")[0]


def start_network(c, device, real):
    """What the generator and the fake network start from: the teacher itself; with the exact toy
    teacher (no network) <out_dir>/teacher.pt. If that is missing it is trained here, in the open:
    a DiT regressed onto the exact velocity, as --stage teacher --teacher_target exact does."""
    path = os.path.join(c.out_dir, "teacher.pt")
    if c.teacher != "toy":
        return real
    if not os.path.exists(path):
        print(f"--teacher toy: the student starts from a DiT regressed onto the exact velocity, "
              f"not there yet; training it now into {path} ({c.teacher_steps} steps), as `python "
              f"swd_mini.py --stage teacher --teacher_target exact --out_dir {c.out_dir}` does")
        train_teacher(dataclasses.replace(c, teacher_target="exact", resume=False, eval_every=0),
                      device)
    model, start_c, _ = model_from_checkpoint(path, device, like=c, kind="teacher")
    print(f"the student starts from {path} (--teacher_target {start_c.teacher_target})")
    return model


def drawn_once(path, what, draw, key):
    """The dict of tensors draw() makes, drawn on first use by rank 0 and cached at path with key,
    the settings it was drawn with (every rank reads it back): the --real teacher bank, the
    --reg_weight pairs. A cache drawn with other settings is refused, not redrawn over."""
    if not os.path.exists(path):
        print(f"{what} into {path} (once)")
        bank = draw()
        if DIST.rank == 0:
            atomic_save(dict({k: v.cpu() for k, v in bank.items()}, key=key), path)
        DIST.barrier()
    bank = torch.load(path, map_location="cpu", weights_only=True)
    if bank.pop("key", None) != key:
        raise UserError(f"{path} was drawn for another run (or by an older swd_mini.py), this one "
                        f"needs {key}; delete it (it is drawn again) or pass another --out_dir")
    return bank


def teacher_bank(real, c, device):
    """--real teacher: --real_n class-balanced samples of the teacher (Euler, --sample_steps, CFG),
    drawn once and cached as <out_dir>/teacher_bank.pt: the "real" images of SwD's official runs,
    so that DMD, the GAN and the patch loss all target the teacher's distribution."""
    def draw():
        y, g = grid_labels(c.real_n, c, device), seeded(c.seed + 11)
        x = torch.cat([teacher_sampler(real, c, y[j:j + c.eval_batch], generator=g).cpu()
                       for j in range(0, c.real_n, c.eval_batch)]).clamp(-1, 1)
        return dict(x=x, y=y)

    bank = drawn_once(os.path.join(c.out_dir, "teacher_bank.pt"),
                      f"--real teacher: drawing {c.real_n} teacher samples", draw, dict(
                          teacher=c.teacher or "<out_dir>/teacher.pt", n=c.real_n, seed=c.seed,
                          labels=c.labels, sample_steps=c.sample_steps, cfg=c.cfg))
    return Data(c, device, images=(bank["x"], bank["y"]))


def ode_pairs(real, c, device, means=None):
    """--reg_weight: --reg_n (x, label, the real score's Euler solution from x at its level, CFG,
    --sample_steps over [0, 1]) for the first trained step i: x is what the sampler feeds step i,
    pure noise at step 1; past an untrained step 1, its means (first_step_means, where its hold
    keeps it) up-sampled and re-noised. Drawn once and cached as <out_dir>/ode_pairs.pt."""
    i = trained_steps(c)[0]
    r, s = step_scales(c)[i], c.levels[i]

    def draw():
        y = grid_labels(c.reg_n, c, device)
        z = torch.randn(c.reg_n, c.channels, r, r, generator=seeded(c.seed + 13)).to(device)
        z = z if i == 0 else noised(upsample(means[y], r), s, z)
        steps = max(1, round(s * c.sample_steps))
        x = torch.cat([teacher_sampler(real, c, y[j:j + c.eval_batch], steps,
                                       noise=z[j:j + c.eval_batch], start=s)
                       for j in range(0, c.reg_n, c.eval_batch)])
        return dict(z=z, y=y, x=x)

    bank = drawn_once(os.path.join(c.out_dir, "ode_pairs.pt"),
                      f"--reg_weight: solving the real score's ODE from {c.reg_n} inputs of step "
                      f"{i + 1}", draw, dict(teacher=c.teacher or "<out_dir>/teacher.pt",
                                             n=c.reg_n, seed=c.seed, labels=c.labels,
                                             scales=step_scales(c)[:i + 1], level=s, data=c.data,
                                             data_dir=c.data_dir, sample_steps=c.sample_steps,
                                             cfg=c.cfg))
    return tuple(bank[k].to(device) for k in ("z", "y", "x"))


def distill(c, device):
    """SwD (or, with --full_res, full-resolution DMD2): generator, fake network and GAN head,
    copied from the start network, against the frozen real score; steps cycle over the scales."""
    torch.manual_seed(c.seed)
    real = load_real_score(c, device)
    init = start_network(c, device, real)
    torch.manual_seed(c.seed)
    bank = c.real == "teacher" and c.teacher != "toy"  # the "real" images: teacher samples
    data = teacher_bank(real, c, device) if bank else Data(c, device)
    student, guard, scales = Student.start(c, device, init), Guard(), step_scales(c)
    nets, real = student.state(), compiled(frozen_copy(real, c, device), c)
    compiled(student.gen, c), compiled(student.fake, c)
    start = resume_from(os.path.join(c.out_dir, "student.pt"), "student", c, nets)
    set_distill_rates(student, c, start)  # the flags' rates, not a resumed checkpoint's

    trained = trained_steps(c)
    hold = c.reg_weight > 0 and 0 not in trained  # the data's means, not the bank's (guided)
    dataset = data if not bank else Data(c, device) if hold else None  # the dataset, loaded once
    means = first_step_means(dataset, c, scales[0]) if hold else None
    pairs = ode_pairs(real, c, device, means) if c.reg_weight > 0 else None
    probes = c.probe_every and JsonLog(os.path.join(c.out_dir, "fake_probe.jsonl"), c.resume)

    def step_fn(step):
        i = trained[step % len(trained)]
        iteration = functools.partial(distill_iteration, student, real, data, c, i, guard, step,
                                      pairs, means)
        probe = c.probe_every and step % c.probe_every < len(trained)  # each step, in turn
        return (probed(iteration, student, real, data, c, i, step, probes) if probe else
                iteration()), scales[i]

    def grid(path):  # one row per sample, one column per step (its x0_hat, upsampled)
        _, traj = student_sampler(student.gen, c, grid_labels(8, c, device), seeded(c.seed),
                                  return_trajectory=True)
        save_grid(torch.stack([upsample(t, c.res) for t in traj], 1).flatten(0, 1), path, len(traj))

    train_loop(c, "student", c.distill_steps, start, step_fn, nets,
               lambda y, g: student_sampler(student.gen, c, y.to(device), g,
                                            return_trajectory=True)[1], grid, guard,
               dataset)  # curves: against the dataset, never the bank
    return student.gen


# ------------------------------------------------------------------------------------------
#                            Sampling from checkpoints: --stage sample
# ------------------------------------------------------------------------------------------


def seeded(seed):
    """A CPU generator with this seed: reproducible draws on any device."""
    return torch.Generator().manual_seed(seed)


def grid_labels(n, c, device):
    """n labels, every class in turn (or those of --labels, cycled)."""
    classes = list(range(c.num_classes)) if c.labels == "all" else \
        [int(v) for v in c.labels.split(",")]
    return torch.tensor([classes[j % len(classes)] for j in range(n)], device=device)


def save_grid(x, path, nrow=None):
    """Images in [-1, 1] as a PNG grid, nrow per row (default: a square); rank 0 alone writes."""
    from torchvision.utils import save_image
    if DIST.rank == 0:
        save_image((x.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow or int(math.sqrt(len(x))),
                   padding=1)


def sampler_from(path, c, device, kind=None):
    """(kind, sample(y, generator) -> images, its config) of a teacher.pt or student.pt (kind:
    the one it must be, or None for either); a teacher with this run's --cfg, --sample_steps."""
    net, net_c, kind = model_from_checkpoint(path, device, kind=kind)
    net_c = dataclasses.replace(net_c, cfg=c.cfg, sample_steps=c.sample_steps, labels=c.labels)
    if kind == "teacher":
        return kind, lambda y, g: teacher_sampler(net, net_c, y, generator=g), net_c
    return kind, lambda y, g: student_sampler(net, net_c, y, g), net_c


def write_samples(sample, y, folder, c):
    """sample(y, generator) -> images, written as numbered PNGs into folder in chunks of
    --eval_batch (under torchrun each rank its own chunks). A chunk's noise depends only on --seed
    and where it starts, and a chunk already on disk is skipped: a stopped run resumes."""
    from torchvision.utils import save_image
    from tqdm import tqdm
    os.makedirs(folder, exist_ok=True)
    chunks = range(DIST.rank * c.eval_batch, len(y), DIST.world * c.eval_batch)
    for j in tqdm(chunks, desc=f"PNGs -> {folder}", disable=DIST.rank > 0 or len(chunks) < 4):
        names = [os.path.join(folder, f"{k:06d}.png") for k in range(j, min(len(y),
                                                                             j + c.eval_batch))]
        if not all(os.path.exists(p) for p in names):
            x = sample(y[j:j + len(names)], seeded(c.seed * 1_000_003 + j)).float().cpu()
            for img, name in zip(x, names):
                save_image((img.clamp(-1, 1) + 1) / 2, name + ".tmp.png")
                os.replace(name + ".tmp.png", name)
    DIST.barrier()


def run_sample(c, device):
    """--stage sample: --n images of --ckpt (else <out_dir>/student.pt, then teacher.pt), labels
    from --labels. Up to 256: a grid samples_<kind>.png. More: numbered PNGs in <out_dir>/samples/
    (write_samples: resumable, one shard per rank), then samples.npz, uint8 NHWC RGB 'arr_0' with
    'labels': what DiT's sample_ddp.py writes and ADM's evaluation suite reads."""
    from PIL import Image
    found = [(k, os.path.join(c.out_dir, f"{k}.pt")) for k in ("student", "teacher")]
    kind, path = (None, c.ckpt) if c.ckpt else next(
        ((k, p) for k, p in found if os.path.exists(p)), (None, ""))
    if not path:
        raise UserError(f"no --ckpt and no teacher.pt or student.pt in {c.out_dir}; train one or "
                        "pass --ckpt PATH")
    kind, sample, net_c = sampler_from(path, c, device, kind)
    y = grid_labels(c.n, net_c, device)
    if c.n <= 256:
        save_grid(sample(y, seeded(c.seed)), os.path.join(c.out_dir, f"samples_{kind}.png"))
        return print(f"wrote {os.path.join(c.out_dir, f'samples_{kind}.png')} ({c.n} of {path})")
    folder, npz, want = (os.path.join(c.out_dir, "samples"), os.path.join(c.out_dir, "samples.npz"),
                         (c.n, net_c.res, net_c.res, 3))
    if os.path.exists(npz):  # refuse to mix with another run's dump
        with np.load(npz) as f:
            if f["arr_0"].shape != want:
                raise UserError(f"{npz} holds images {f['arr_0'].shape}, this run makes {want}; "
                                "move it or pass another --out_dir")
    write_samples(sample, y, folder, c)
    if DIST.rank == 0:
        x = np.stack([np.asarray(Image.open(os.path.join(folder, f"{k:06d}.png")).convert("RGB"))
                      for k in range(c.n)])
        with open(npz + ".tmp", "wb") as f:
            np.savez(f, arr_0=x, labels=y.cpu().numpy())
        os.replace(npz + ".tmp", npz)
        print(f"wrote {c.n} PNGs in {folder} and {npz} (uint8 NHWC, with labels) from {path}")


# ==========================================================================================
#                                        Measuring it
# ==========================================================================================


class LearningCurve:
    """--eval_every: rows of the sampling model in log.jsonl: {"stage": "eval", "of", "step", "fd",
    "meter" ({res: [dB per band]}), "seconds" (the loop's wall time less these rows' own;
    --probe_every's probes count in it), "floor" (FD of as many data images), "n"}. On the toy
    world, toy_teacher's curve_row: exact FD, the blur meter ("meter") and the prototype error's
    bands ("proto": DC, then each octave) at every scale, "mode_kl", and at the last step "parts"
    (fd_parts). On other data: pixel FD against n dataset images drawn once, and each scale's power
    per octave band against theirs (band_power_db)."""

    def __init__(self, c, log, of, data=None):
        self.c, self.log, self.of, self.n = c, log, of, c.eval_every_n
        self.on = c.eval_every > 0 and DIST.rank == 0 and (of == "student" or c.eval_teacher)
        if self.on and c.data == "toy":
            self.toy = toy_world(c)
            self.floor = self.toy.noise_floor(self.n, seed=c.seed + 7)["fd"]
        elif self.on:  # the training run's Data, or the dataset loaded here
            data = data or Data(c, torch.device("cpu"))
            self.toy, self.ref = None, data.batch(self.n, seeded(c.seed + 5))[0].cpu()
            self.stats = moments(self.ref)
            self.floor = frechet_distance(*moments(data.batch(self.n, seeded(c.seed + 6))[0].cpu()),
                                          *self.stats)
        self.t0, self.spent = time.time(), 0.0

    def row(self, steps, last):
        if self.toy:  # fd_parts (4 s at n = 2000) at the last row only
            return self.toy.curve_row(steps, parts=last)
        steps = [x.float().cpu() for x in steps]
        return dict(fd=frechet_distance(*moments(steps[-1]), *self.stats),
                    meter={x.shape[-1]: band_power_db(x, downsample(self.ref, x.shape[-1]))
                           for x in steps})

    def __call__(self, step, sampler, last=False):
        """sampler(y, generator) -> [x0_hat of each step]; at step 0, every eval_every steps and
        the last step."""
        if not self.on or (step % self.c.eval_every and not last):
            return
        t, g, b = time.time(), seeded(self.c.seed + 8), self.c.eval_batch
        y = torch.arange(self.n) % self.c.num_classes
        chunks = [sampler(y[j:j + b], g) for j in range(0, self.n, b)]  # [[x0_hat per step]]
        row = self.row([torch.cat(step) for step in zip(*chunks)], last)
        self.log.write(stage="eval", of=self.of, step=step, **row, floor=self.floor, n=self.n,
                       seconds=t - self.t0 - self.spent)
        self.spent += time.time() - t


@torch.no_grad()
def fake_error(student, real, x0_g, y, c, levels=(0.02, 0.05, 0.1, 0.2, 0.4, 0.79), toy=None,
               k=None):
    """How well the fake network denoises G's own samples x0_g (B, C, r, r), at each level s:
        excess = mse(x0_fake(x_s), x0_g) / mse(x0_real(x_s), x0_g) - 1,
        push   = RMS of dmd_loss's g = (mu_fake - mu_real) / mean|x0_g - mu_real|,
    both scores fed the same x_s, the real one unguided (under --cfg, DMD's mu_real is guided).
    With m_G = E_G[x0|x_s], G's own (Bayes) denoiser, the signal DMD needs is d = m_G - mu_real
    and the fake network's error is e = mu_fake - m_G; in expectation (the cross terms vanish, as
    both denoisers see only x_s), excess = (E|e|^2 - E|d|^2) / mse_real:
    at excess >= 0 the fake network's error is at least as large as the signal it estimates, and
    below 0 it has learned part of that signal. With toy (a ToyTeacher), also texture_cos: per
    level, the cosine per band of DMD's move mu_real - mu_fake with the random and the systematic
    part of G's texture (texture_alignment: > 0 raises a part, < 0 lowers it); at full resolution
    also rate: per level, the rate at which that move scales the random part per band ("learned"),
    and the same for the move of a fake score that knows G's texture spectrum ring by ring and
    nothing else ("fitted", toy.fitted): where learned falls short of fitted in a band, the fake
    network has not resolved G's error there.
    k: x0_g's toy components if already read (toy.assign).
    Returns {"excess": [per level], "push": [per level], "levels": [s]} (+ "texture_cos", "rate")."""
    k = toy and (toy.assign(x0_g.cpu()) if k is None else k)  # read once for every level
    fit = toy and x0_g.shape[-1] == toy.res and toy.fitted(x0_g.cpu(), k=k)
    out = dict(excess=[], push=[], **({"texture_cos": []} if toy else {}),
               **({"rate": []} if fit else {}))
    g = seeded(c.seed + 17)
    for lv in levels:
        s = torch.full((len(y),), lv, device=x0_g.device)
        x_s = noised(x0_g, s, torch.randn(x0_g.shape, generator=g).to(x0_g.device))
        with autocast(x0_g.device, c.precision):
            v_real = real(x_s, s, y)
            v_fake = fake_score(student.fake, v_real, x_s, s, y, c)
        mu_real, mu_fake = (to_x0(x_s, s, v).float() for v in (v_real, v_fake))
        mse = [(mu - x0_g).pow(2).mean() for mu in (mu_fake, mu_real)]
        out["excess"].append(round(float(mse[0] / mse[1] - 1), 4))
        out["push"].append(round(float(2 * dmd_loss(x0_g, mu_real, mu_fake)) ** 0.5, 4))  # 0.5 g^2
        if toy:
            move = (mu_real - mu_fake).cpu()  # DMD's move with this fake network
            cos = toy.texture_alignment(x0_g.cpu(), move, k=k)
            out["texture_cos"].append({part: [round(v, 3) for v in bands]
                                       for part, bands in cos.items()})
        if fit:
            mu_fit = fit.denoise(x_s.cpu().double(), s.cpu(), y.cpu())
            out["rate"].append({name: [round(v, 3) for v in toy.texture_alignment(
                x0_g.cpu(), d, k=k, rate=True)["random"]] for name, d in (
                ("learned", move), ("fitted", mu_real.cpu() - mu_fit))})
    return dict(out, levels=list(levels))


def loss_forces(student, real, x0_g, target, y, c, toy, levels=(0.02, 0.05, 0.1, 0.2, 0.4),
                k=None):
    """Where each generator loss term pushes G's texture: per term of generator_losses, weighted,
    toy.texture_alignment(rate=True) of minus its gradient at G's samples x0_g (B, C, r, r), the
    random part per band (> 0 raises that band's texture, < 0 blurs it; the terms' rates add).
    "mmd@s": the patch loss with its features' level fixed at s, to see which levels pull where.
    k: x0_g's toy components if already read. Returns {term: [rate per band]}."""
    k = toy.assign(x0_g.cpu()) if k is None else k
    g, b = seeded(c.seed + 23), len(y)
    s_d, s_m = (torch.empty(b).uniform_(*lh, generator=g).to(x0_g.device)
                for lh in (c.dmd_levels, c.mmd_levels))
    eps_d, eps_m = (torch.randn(x0_g.shape, generator=g).to(x0_g.device) for _ in range(2))
    out = {}
    for lv in (None, *levels):  # one call per level: the configured one reads all three terms
        names = ("dmd", "gan", "mmd") if lv is None else ("mmd",)
        x = x0_g.detach().requires_grad_(True)
        with torch.enable_grad():
            terms = generator_losses(x, target, y, real, student.fake, student.head, s_d, eps_d,
                                     s_m if lv is None else torch.full_like(s_m, lv), eps_m, c)
            for j, term in enumerate(names):
                (grad,) = torch.autograd.grad(getattr(c, f"{term}_weight") * terms[term], x,
                                              retain_graph=j < len(names) - 1)
                rates = toy.texture_alignment(x0_g.cpu(), -grad.cpu(), k=k, rate=True)["random"]
                out[term if lv is None else f"{term}@{lv}"] = [float(f"{v:.3g}") for v in rates]
    return out


def probed(iteration, student, real, data, c, i, step, log, n=256):
    """--probe_every: run iteration() between two fake_error readings at step i, on one batch of
    G's samples drawn before it: "before" (the fake network as the other steps' updates left it)
    and "use" (after this step's --fake_updates, as DMD uses it): a row of log, fake_probe.jsonl;
    on the toy world also "forces" (loss_forces, after the step)."""
    dev = data.device  # fork (save, then restore) the CPU's and this device's random streams
    with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev],
                               device_type="cuda" if dev.type == "cpu" else dev.type):
        torch.manual_seed(c.seed + 19 + step)  # the probe's draws leave training's stream as it was
        x, y = data.batch(n)
        x_in, target = generator_inputs(student.gen, x, y, i, c)
        with torch.no_grad(), autocast(dev, c.precision):
            x0_g = to_x0(x_in, c.levels[i], student.gen(x_in, c.levels[i], y)).float()
    toy = toy_world(c) if c.data == "toy" else None
    k = toy and toy.assign(x0_g.cpu())  # G's samples' components, read once for all readings
    before = fake_error(student, real, x0_g, y, c, toy=toy, k=k)
    out = iteration()
    forces = toy and dict(forces=loss_forces(student, real, x0_g, target, y, c, toy, k=k))
    log.write(step=step, i=i, res=x0_g.shape[-1], before=before,
              use=fake_error(student, real, x0_g, y, c, toy=toy, k=k), **(forces or {}))
    return out


# ------------------------------------------------------------------------------------------
#                                   Metrics on any dataset
# ------------------------------------------------------------------------------------------


def spectral_distance(x, ref):
    """RMS over rings of 10 log10(RAPSD(x) / RAPSD(ref)) in dB: 0 for equal spectra, 3 dB for power
    off by a factor of 2 everywhere."""
    ratio = rapsd(x.cpu())[1] / rapsd(ref.cpu())[1]
    return (10 * ratio.log10()).pow(2).mean().sqrt().item()


def band_power_db(x, ref):
    """x's power over ref's per octave band, in dB, finest band last: the blur meter's reading for
    data without a known distribution (blur: negative). The blur meter's bands (toy_teacher's
    octave_masks: [1, ..), .., [r/8, r/4), [r/4, inf) cycles per image, DC in none); power is the
    mean |FFT|^2 over the band's frequencies, corners included."""
    from toy_teacher import octave_masks  # the bands the toy world's blur meter reads
    px, pr = ((torch.fft.fft2(z.double().cpu(), norm="ortho").abs() ** 2).mean((0, 1))
              for z in (x, ref))
    return [10 * math.log10(px[m].mean() / pr[m].mean()) for m in octave_masks(x.shape[-1])]


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^1/2) between two Gaussians, the maths of FID (Heusel
    et al. 2017); the trace of the root is the sum of sqrt(eig(C1^1/2 C2 C1^1/2))."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, cov1, mu2, cov2))
    ev, U = torch.linalg.eigh(cov1)
    root1 = U @ torch.diag(ev.clamp(min=0).sqrt()) @ U.T
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross)


def moments(x):
    """Mean and covariance of a set of vectors (N, D) in float64."""
    x = x.double().flatten(1)
    return x.mean(0), torch.cov(x.T)


FID_HOW = ("`pip install torch-fidelity` and its Inception weights (downloaded on first use, or "
           "--fid_weights FILE)")


def compute_fid(folder, reference, device, weights="", features=None):
    """FID of the PNGs in folder against reference (a folder, or torch-fidelity's registered
    "cifar10-train"), by torch-fidelity, never home-made (its Inception port is the one papers'
    numbers come from). features: an injection point for tests, a callable uint8 (B, 3, H, W) ->
    (B, D) in place of Inception (frechet_distance of their moments). Returns (fid or None, notice
    or None)."""
    if features is not None:
        from PIL import Image
        stats = []
        for d in (folder, reference):
            imgs = [np.asarray(Image.open(os.path.join(d, f)).convert("RGB"))
                    for f in sorted(os.listdir(d)) if f.endswith(".png")]
            stats.append(moments(features(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))))
        return frechet_distance(*stats[0], *stats[1]), None
    try:
        import torch_fidelity
        kw = dict(feature_extractor_weights_path=weights) if weights else {}
        value = torch_fidelity.calculate_metrics(input1=folder, input2=reference, fid=True,
                                                 cuda=device.type == "cuda", verbose=False, **kw)
        return float(value["frechet_inception_distance"]), None
    except ImportError:
        return None, f"FID not computed: no torch-fidelity; {FID_HOW}"
    except Exception as e:  # most often: the weights or the reference cannot be downloaded
        return None, f"FID not computed: {type(e).__name__}: {str(e)[:120]}; {FID_HOW}"


def image_metrics(x, ref, toy=None):
    """The sample-quality numbers of a set x against reference images ref (both on the CPU): FD of
    their pixel moments, power per octave band (dB) and spectral distance; on the toy world the
    exact FD (against the true moments), NLL, mode KL, modes hit, the blur meter, the FD's parts
    (toy_teacher's fd_parts: prototypes, modes, texture) and the prototype error's bands instead."""
    k = toy and toy.assign(x)  # each sample's component, read once for the three that need it
    m = dict(toy.evaluate(x), bands=toy.blur_meter(x, k=k), fd_parts=toy.fd_parts(x, k=k),
             proto=toy.prototype_error(x, k=k)["bands"]) if toy else dict(
        fd=frechet_distance(*moments(x), *moments(ref)), bands=band_power_db(x, ref))
    return dict(m, spectral_db=spectral_distance(x, ref))


# ------------------------------------------------------------------------------------------
#                                        --stage eval
# ------------------------------------------------------------------------------------------


def eval_samplers(c, device):
    """[(name, nfe, sample(y, generator))]: the teacher's Euler at --sample_steps and at 4 steps
    (a teacher.pt, or the exact toy world with --teacher toy), then every student.pt in out_dir and
    its sub-folders. NFE: network calls per image (two per step under CFG)."""
    rows, path = [], c.teacher or os.path.join(c.out_dir, "teacher.pt")
    if c.teacher == "toy" or os.path.exists(path):
        model, tag = load_real_score(c, device), "exact " if c.teacher == "toy" else ""
        for steps in sorted({c.sample_steps, 4}, reverse=True):
            rows.append((f"{tag}teacher Euler, {steps} steps", steps * (1 if c.cfg == 1 else 2),
                         lambda y, g, k=steps: teacher_sampler(model, c, y, k, g)))
    for folder in ["."] + sorted(os.listdir(c.out_dir)):
        path = os.path.join(c.out_dir, folder, "student.pt")
        if os.path.isfile(path):
            _, sample, sc = sampler_from(path, c, device)
            name = ("DMD2 full-res" if sc.full_res else "SwD") + f", {len(sc.scales)} steps"
            rows.append((name + (f" [{folder}]" if folder != "." else ""), len(sc.scales), sample))
    return rows


def run_eval(c, device):
    """--stage eval: every sampler of eval_samplers against the data; the first row, a second
    draw of data, is the floor. Writes table.md and metrics.json, whose keys are:
    - `metrics.json`: `config`, `n`, `n_ref`, `reference`, `samplers`, `fid_note`
    - `metrics.json samplers` (one per row): `name`, `nfe`, `ms_per_image` (not on the floor),
      `fd`, `bands` (dB per octave band, finest last), `spectral_db`, `fid` or `fid_notice` (with
      --fid true); on the toy world `fd` is exact and `bands` the blur meter, with `nll`,
      `mode_kl`, `modes_hit`, `fd_parts`, `proto` (the prototype error: DC, then each octave).
      With --fid true on cifar10: FID-50k against its training set."""
    data = Data(c, device)
    n, n_ref = c.eval_n, c.eval_ref or c.eval_n
    ref = data.batch(n_ref, seeded(c.seed + 1))[0].cpu()
    res = dict(config=dataclasses.asdict(c), n=n, n_ref=n_ref, reference=f"{n_ref} {c.data} images",
               samplers=[dict(name="data (floor)", nfe=0, **image_metrics(
                   data.batch(n, seeded(c.seed + 2))[0].cpu(), ref, data.toy))])
    fid_ref, fid_n = ("cifar10-train", 50000) if c.data == "cifar10" else (
        os.path.join(c.out_dir, "fid", "reference"), n)
    res["fid_note"] = "FID off (--fid false)" if not c.fid else f"FID of {fid_n} samples " + (
        "against the CIFAR-10 training set (50000 images)" if c.data == "cifar10" else
        f"against {n_ref} {c.data} images: a trend only (papers report 50000)")
    if c.fid and c.data != "cifar10":
        write_samples(lambda y, g: ref[:len(y)], torch.zeros(n_ref), fid_ref, c)
    print(res["fid_note"])
    y = grid_labels(n, c, device)
    for k, (name, nfe, sample) in enumerate(eval_samplers(c, device)):
        sample(y[:8], seeded(c.seed + 3))  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        x = torch.cat([sample(y[j:j + c.eval_batch], seeded(c.seed + j)).float().cpu()
                       for j in range(0, n, c.eval_batch)])
        row = dict(name=name, nfe=nfe, ms_per_image=1000 * (time.perf_counter() - t0) / n,
                   **image_metrics(x, ref, data.toy))
        if c.fid:
            folder = os.path.join(c.out_dir, "fid", f"sampler_{k}")
            write_samples(sample, grid_labels(fid_n, c, device), folder, c)
            fid, notice = compute_fid(folder, fid_ref, device, c.fid_weights)
            row.update(fid=fid) if fid is not None else row.update(fid_notice=notice)
        res["samplers"].append(row)
    write_outputs(c.out_dir, {"metrics.json": res, "table.md": results_table(res)})
    plot_learning_curves(c.out_dir, os.path.join(c.out_dir, "learning_curves.png"))
    return res


def results_table(results):
    """Markdown table of the sampler rows of run_eval."""
    rows, toy = results["samplers"], "mode_kl" in results["samplers"][0]
    fid = any("fid" in r or "fid_notice" in r for r in rows)
    head = ["sampler", "NFE", "exact FD" if toy else "pixel FD"] + (
        ["FD: no prototype error / its modes only / its texture only", "mode KL"] if toy else [])
    head += [f"dB, band {k + 1}" for k in range(len(rows[0]["bands"]))] + ["spectral dB"]
    lines = [f"n = {results['n']} samples, reference {results['reference']}; bands: power per "
             f"octave, finest last (0 dB: right; blur reads negative)" + (
                 "; FD parts: prototype error removed / modes only / texture only, the other "
                 "parts exact" if toy else "") + f". {results['fid_note']}", "",
             "| " + " | ".join(head + (["FID"] if fid else []) + ["ms / image"]) + " |",
             "|" + "---|" * (len(head) + fid + 1)]
    for r in rows:
        parts = toy and " / ".join(f"{r['fd_parts'][k]:.1f}" for k in ("prototypes", "modes",
                                                                         "texture"))
        cells = [r["name"], str(r["nfe"]), f"{r['fd']:.1f}"] + (
            [parts, f"{r['mode_kl']:.3f}"] if toy else []) + [f"{v:+.2f}" for v in r["bands"]]
        cells += [f"{r['spectral_db']:.2f}"] + ([f"{r['fid']:.2f}" if r.get("fid") else "-"]
                                               if fid else [])
        lines.append("| " + " | ".join(cells + [f"{r.get('ms_per_image', 0):.3f}"]) + " |")
    return "\n".join(lines)


def write_outputs(out_dir, files):
    """Write {name: dict (as JSON) or text}, print the text ones, say what was written."""
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            if isinstance(content, str):
                print(content)
                f.write(content + "\n")
            else:
                json.dump(content, f, indent=1)
    print(f"wrote {', '.join(files)} in {out_dir}")


# ------------------------------------------------------------------------------------------
#                          --stage bench: ops, host syncs, time
# ------------------------------------------------------------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402 (the counter's base)


class OpCounter(TorchDispatchMode):
    """Counts what reaches the backend kernels, after autograd, autocast and decompositions: on a
    GPU each op is about one kernel launch; views are free. Host syncs: a value read back to
    Python (.item(), bool()), a tensor made from Python data, a copy between two devices.

    Compiled graphs run compiled under it (ignore_compile_internals): their library calls
    (matmuls, attention) reach it as ops, their fused kernels do not. fused=True adds those from
    the profiler: each C++ kernel a graph runs, recorded when inductor compiled it with
    torch._inductor.config.cpp.enable_kernel_profile (on the CPU)."""
    FREE = {"view", "_unsafe_view", "t", "permute", "expand", "select", "slice", "transpose",
            "unsqueeze", "squeeze", "as_strided", "detach", "alias", "split", "split_with_sizes",
            "unbind", "chunk", "unflatten", "_reshape_alias", "view_as_real", "view_as_complex",
            "_record_function_enter_new", "_record_function_exit"}  # views; profiler marks

    def __init__(self, fused=False):
        super().__init__()
        self.prof = fused and torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU])

    @classmethod
    def ignore_compile_internals(cls):
        return True  # compiled code is not replayed eagerly for the counter

    def __enter__(self):
        self.ops, self.syncs = 0, 0
        if self.prof:
            self.prof.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.prof:
            self.prof.__exit__(*exc)
            self.ops += sum(e.cpu_parent is not None and e.cpu_parent.name.startswith(
                "## Call CompiledFxGraph") and not e.name.startswith("aten::")
                for e in self.prof.events())  # a graph's fused kernels (its calls came here)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = func.overloadpacket.__name__, kwargs or {}
        if name in ("_local_scalar_dense", "lift_fresh") or (
                name == "_to_copy" and kwargs.get("device") not in (None, args[0].device)) or (
                name == "copy_" and args[0].device != args[1].device):
            self.syncs += 1
        elif name not in self.FREE:
            self.ops += 1
        return func(*args, **kwargs)


def dit_macs(c, r):
    """Multiply-adds per image of one DiT call at resolution r: per block and token, qkv + output
    projection (4 d^2) and MLP (2 mlp_ratio d^2), plus attention's two T x T x d products."""
    T, d = (r // c.patch) ** 2, c.hidden
    return c.depth * T * ((4 + 2 * c.mlp_ratio) * d * d + 2 * T * d)


def iteration_costs(c, device, count=False):
    """Per iteration, of fresh networks of c's size on random images held on the device: SwD's and
    full-resolution DMD2's distillation iterations (mean over the K scales) and the teacher's step.
    count: ops and host syncs (OpCounter) after a warm-up; else median seconds."""
    images = torch.randint(0, 256, (256, c.channels, c.res, c.res), dtype=torch.uint8)
    data = Data(c, device, (images, torch.arange(256) % c.num_classes))
    K, guard = len(c.scales), Guard()
    if count and c.compile:  # before compiling: then each fused kernel shows in the profiler
        import torch._inductor.config as inductor
        inductor.cpp.enable_kernel_profile = True

    def measure(fn):
        fn()
        if count:
            with OpCounter(fused=c.compile) as m:
                fn()
            return dict(ops=m.ops / K, host_syncs=m.syncs / K)
        times = []
        for _ in range(c.bench_repeats):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) / K)
        return sorted(times)[len(times) // 2]
    # copies are made before compiling: a deep copy of a compiled() net calls the original
    init = frozen_copy(DiT.from_config(c).to(device).requires_grad_(False), c, device)
    real, out = compiled(copy.deepcopy(init), c), {}
    for name, full in (("swd", False), ("dmd2", True)):
        run_c = dataclasses.replace(c, full_res=full)
        st = Student.start(run_c, device, init)
        compiled(st.gen, c), compiled(st.fake, c)
        out[name] = measure(lambda: [distill_iteration(st, real, data, run_c, i, guard)
                                     for i in range(K)])
    model = DiT.from_config(c).to(device)
    ema, opt = copy.deepcopy(model).requires_grad_(False), torch.optim.AdamW(model.parameters(),
                                                                             fused=True)
    compiled(model, c)
    out["teacher"] = measure(lambda: [teacher_step(j, model, model, ema, opt, data, c, guard)
                                      for j in range(K)])
    return out


def run_bench(c, device):
    """--stage bench, printed and written to bench.json (keys below): on this device, at c's size.
    - `bench.json`: `device`, `torch`, `preset`, `ops`, `ops_compiled`, `seconds`, `sampling`
    - `bench.json ops`: `swd`, `dmd2` (per iteration), `teacher` (per step), each with `ops` and
      `host_syncs` (OpCounter at c's shape: depth, patch, scales, CFG, precision; width and batch
      do not change the counts, so they are counted narrow)
    - `bench.json ops_compiled` (null unless --compile true on the CPU): the same, compiled: each
      graph's library calls and fused kernels, and the ops outside the graphs
    - `bench.json seconds`: `swd`, `dmd2`, `teacher` (median of --bench_repeats; --compile true:
      compiled), `swd_over_dmd2`, `teacher_img_per_s`, `teacher_mfu` (CUDA with a known bf16
      peak, else null)
    - `bench.json sampling`: `scale_wise_s`, `full_res_s` (K steps, batch --bench_n),
      `measured_ratio`, `macs_ratio`"""
    import platform
    torch.manual_seed(c.seed)
    narrow = dataclasses.replace(c, hidden=8 * c.heads, batch=2 * DIST.world * c.accum,
                                 distill_batch=2 * DIST.world * c.accum, compile=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    out = dict(device=name, torch=torch.__version__, preset=c.preset,
               ops=iteration_costs(narrow, device, count=True), ops_compiled=None)
    if c.compile and device.type == "cpu":  # compiled: library calls plus fused kernels
        out["ops_compiled"] = iteration_costs(dataclasses.replace(narrow, compile=True), device,
                                              count=True)
    K, out["seconds"], t = len(c.scales), None, {False: None, True: None}
    if c.bench_repeats:  # 0: counts only
        sec = iteration_costs(c, device)
        flops = 6 * c.batch * sum(dit_macs(c, r) for r in c.scales) / K / sec["teacher"]
        peak = next((p * 1e12 for k, p in BF16_PEAK_TFLOPS if k in name), None)
        out["seconds"] = dict(sec, swd_over_dmd2=sec["swd"] / sec["dmd2"], teacher_mfu=peak and
                              flops / peak, teacher_img_per_s=c.batch / sec["teacher"])
        net = DiT.from_config(c).to(device).eval().requires_grad_(False)
        y = grid_labels(c.bench_n, c, device)
        for full in (False, True):
            student_sampler(net, c, y, full_res=full)
            synchronize(device)
            t0 = time.perf_counter()
            student_sampler(net, c, y, full_res=full)
            synchronize(device)
            t[full] = time.perf_counter() - t0
    out["sampling"] = dict(scale_wise_s=t[False], full_res_s=t[True], measured_ratio=t[True] and
                           t[False] / t[True], macs_ratio=sum(map(lambda r: dit_macs(c, r), c.scales)) /
                           (K * dit_macs(c, c.res)))
    write_outputs(c.out_dir, {"bench.json": out, "bench.md": bench_table(out, c)})
    return out


# bf16 dense tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched in this order
BF16_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989),
                    ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125)]


def bench_table(b, c):
    """bench.json as markdown."""
    o, s, sa = b["ops"], b["seconds"], b["sampling"]
    lines = [f"bench on {b['device']}, torch {b['torch']}, preset {b['preset']}", "",
             "| | SwD iteration | DMD2 iteration | teacher step |", "|---|---|---|---|",
             "| ops | " + " | ".join(f"{o[k]['ops']:.0f}" for k in ("swd", "dmd2", "teacher")) + " |",
             "| host syncs | " + " | ".join(f"{o[k]['host_syncs']:.0f}"
                                          for k in ("swd", "dmd2", "teacher")) + " |"]
    if b.get("ops_compiled"):
        lines.insert(-1, "| launches, compiled | " + " | ".join(
            f"{b['ops_compiled'][k]['ops']:.0f}" for k in ("swd", "dmd2", "teacher")) + " |")
    if s:
        mfu = f", MFU {s['teacher_mfu']:.3f}" if s["teacher_mfu"] else ""
        lines += ["| ms | " + " | ".join(f"{1e3 * s[k]:.1f}" for k in ("swd", "dmd2", "teacher"))
                  + " |", "", f"SwD / DMD2 iteration {s['swd_over_dmd2']:.3f}; teacher "
                  f"{s['teacher_img_per_s']:.0f} img/s{mfu}; sampling, {len(c.scales)} scale-wise "
                  f"/ full-res steps, batch {c.bench_n}: {sa['measured_ratio']:.3f} "
                  f"(MACs {sa['macs_ratio']:.3f})."]
    else:
        lines += ["", f"Untimed (--bench_repeats 0); sampling MACs ratio {sa['macs_ratio']:.3f}."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
#                     --stage spectra: the spectral argument as figures
# ------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print(f"wrote {path}")


def noise_figure(c, x0, levels, g):
    """spectra_1_noise.png. Left: the data's RAPSD and power law, x_t at several levels (dashed:
    the noise s eps alone; dotted: the crossover k*(s)). Right: k*(s) against s, with each step of
    the hand and the auto schedule at (s_i, the previous scale's Nyquist frequency)."""
    plt, (f, P) = pyplot(), rapsd(x0)
    slope, intercept = power_law_fit(f, P)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].loglog(f, P, "k", lw=2, label=f"data (slope {slope:.2f})")
    ax[0].loglog(f, (slope * f.log() + intercept).exp(), "k:", lw=0.8, label="power-law fit")
    out = dict(slope=slope, levels=[])
    for s, col in zip(levels, plt.cm.viridis(np.linspace(0, 0.9, len(levels)))):
        eps = torch.randn(x0.shape, generator=g)
        ax[0].loglog(*rapsd(noised(x0, s, eps)), color=col, label=f"x_t, s={s}")
        ax[0].loglog(f, rapsd(s * eps)[1], "--", color=col, lw=0.8)
        ax[0].axvline(crossover(f, P, s), color=col, ls=":", lw=0.8)
        out["levels"].append(dict(s=s, crossover=crossover(f, P, s)))
    ax[0].set(xlabel="frequency (cycles / pixel)", ylabel="power", title="x_t; dashed: s eps")
    ax[0].legend(fontsize=7, loc="lower left")
    grid = np.linspace(0.02, 0.99, 60)
    out["crossover_curve"] = [crossover(f, P, float(s)) for s in grid]
    ax[1].semilogy(grid, out["crossover_curve"], "k", label="k*(s): signal = noise")
    auto = auto_schedule(f, P, c.scales, c.schedule_margin)
    for name, lv, mk in (("--levels", c.levels, "o"), ("auto", auto, "s")):
        ax[1].semilogy(lv[1:], [r / (2 * c.res) for r in c.scales[:-1]], mk,
                       label=f"{name} " + ", ".join(f"{v:.2f}" for v in lv))
    ax[1].set(xlabel="noise level s", ylabel="cycles / full-res pixel")
    ax[1].set_title("step i at (s_i, Nyquist of r_(i-1)): above the curve,\nthe noise hides what "
                    "the previous scale could not hold", fontsize=9)
    ax[1].legend(fontsize=7, loc="lower left")
    ticks = plt.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".strip("0.")[0] in "125" else "")
    for axis in ax[0].xaxis, ax[1].yaxis:
        axis.set_major_formatter(ticks), axis.set_minor_formatter(ticks)
    save_figure(fig, os.path.join(c.out_dir, "spectra_1_noise.png"))
    return dict(out, auto_levels=auto)


def order_experiment(x0, y, denoise, s=0.5, g=None):
    """SwD table 1 on images x0 (B, C, R, R): from R/2 to R px, (a) upsample the clean image, then
    add fresh noise, against (b) noise at R/2, then upsample, both beside a true x_t. Returns
    {name: (image set, x0-MSE of denoise(z, s, y) or None)}."""
    R = x0.shape[-1]
    small = downsample(x0, R // 2)
    eps_r, eps_R = torch.randn(small.shape, generator=g), torch.randn(x0.shape, generator=g)
    sets = {"true x_t": noised(x0, s, eps_R), "(a) up, then noise": noised(upsample(small, R), s,
                                                                           eps_R),
            "(b) noise, then up": upsample(noised(small, s, eps_r), R)}
    return {k: (z, denoise and F.mse_loss(denoise(z, s, y).float(), x0).item())
            for k, z in sets.items()}


def run_spectra(c, device, levels=(0.2, 0.5, 0.8, 0.95)):
    """--stage spectra: spectra_1_noise.png and spectra_2_order.png, the numbers in spectra.json.
    The order experiment's denoiser: the teacher in out_dir, else the exact one on the toy world."""
    x0, y = Data(c, device).batch(512, seeded(c.seed))
    x0, y, g = x0.cpu(), y.cpu(), seeded(c.seed + 1)
    out = noise_figure(c, x0, levels, g)
    path = c.teacher if c.teacher not in ("", "toy") else os.path.join(c.out_dir, "teacher.pt")
    real = load_real_score(dataclasses.replace(c, teacher=path), device) if \
        c.teacher != "toy" and os.path.exists(path) else (
        load_real_score(dataclasses.replace(c, teacher="toy"), device) if c.data == "toy" else None)
    with torch.no_grad():
        denoise = real and (lambda z, s, y_: to_x0(z, s, real(z.to(device), s, y_.to(device))
                                                   .float().cpu()))
        order = order_experiment(x0, y, denoise, g=g)
    fig, ax = pyplot().subplots(figsize=(5, 4))
    for (name, (z, mse)), style in zip(order.items(), ("k", "C0", "C3")):
        ax.loglog(*rapsd(z), style, label=name + (f": x0-MSE {mse:.4f}" if mse else ""))
    ax.set(xlabel="frequency (cycles / pixel)", ylabel="power", title=f"{c.res // 2} -> {c.res} "
           "px at s = 0.5")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(c.out_dir, "spectra_2_order.png"))
    out["order"] = {k: dict(x0_mse=mse, spectral_db=spectral_distance(z, order["true x_t"][0]))
                    for k, (z, mse) in order.items()}
    write_outputs(c.out_dir, {"spectra.json": out})
    print(f"data slope {out['slope']:.2f}; " + ", ".join(
        f"k*({d['s']}) = {d['crossover']:.3f}" for d in out["levels"]) + "; order: " + ", ".join(
        f"{k} {v['spectral_db']:.2f} dB" + (f", x0-MSE {v['x0_mse']:.4f}" if v["x0_mse"] else "")
        for k, v in out["order"].items()))
    return out


def plot_learning_curves(out_dir, path):
    """Learning curves of out_dir and its sub-folders (--eval_every rows of log.jsonl): FD (exact on
    the toy world) and the finest band against step, one line per run; dotted: the floor."""
    curves = {}
    for folder in ["."] + sorted(os.listdir(out_dir)):
        log = os.path.join(out_dir, folder, "log.jsonl")
        for row in map(json.loads, open(log) if os.path.isfile(log) else []):
            if row.get("stage") == "eval":
                run = os.path.basename(os.path.abspath(os.path.join(out_dir, folder)))
                curves.setdefault(f"{run}: {row['of']}", []).append(row)
    if not curves:
        return None
    fig, ax = pyplot().subplots(1, 2, figsize=(10, 4))
    for i, (run, rows) in enumerate(curves.items()):
        steps = [r["step"] for r in rows]
        ax[0].plot(steps, [r["fd"] for r in rows], ".-", color=f"C{i % 10}", label=run)
        ax[0].axhline(rows[0]["floor"], color="k", ls=":", lw=0.8)
        ax[1].plot(steps, [r["meter"][max(r["meter"], key=int)][-1] for r in rows], ".-",
                   color=f"C{i % 10}")
    ax[0].set(xlabel="step", ylabel=f"FD (n = {rows[0]['n']}; dotted: floor)")
    ax[1].set(xlabel="step", ylabel="finest band, dB (0 = the data's texture)")
    ax[1].axhline(0, color="k", ls=":", lw=0.8)
    ax[0].legend(fontsize=7)
    save_figure(fig, path)
    return path


# ==========================================================================================
#                                          Plumbing
# ==========================================================================================
# --------------------------- the numerical guard and checkpoints ----------------------------


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class TrainingStopped(Exception):
    """A run stopped on purpose (non-finite numbers): one line on stderr, exit code 3."""


class Guard:
    """The numerical guard, on the device: a step whose loss terms or gradient norm are not finite
    is not applied (its found_inf flag makes the fused AdamW skip it), and check(), at log and
    checkpoint steps (the one host read), stops the run naming the first such step and term."""

    def __init__(self):
        self.pending = []  # (step, term names, their values) since the last check

    def __call__(self, step, **values):
        v = torch.stack([t.detach().float().reshape(()) for t in values.values()])
        self.pending.append((step, list(values), v))
        return v.sum().isfinite().logical_not().float()  # 1.0: skip (a nan or inf sums to one)

    def check(self):
        if not self.pending:
            return
        finite, pending, self.pending = torch.cat([v for *_, v in self.pending]).isfinite().tolist(
        ), self.pending, []
        bad = iter(not ok for ok in finite)
        for step, names, v in pending:
            for name, value in zip(names, v.tolist()):
                if next(bad):
                    raise TrainingStopped(f"step {step}: {name} is {value}; that step was not "
                                          "applied and the last checkpoint is intact; lower --lr / "
                                          "--distill_lr or raise --warmup, then --resume true")


CHECKPOINT_FORMAT = 3  # bumped when what a checkpoint holds changes


def atomic_save(obj, path):
    """torch.save to a temporary file beside path, flushed and fsynced, then os.replace: a crash
    mid-write leaves the previous file as it was."""
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_checkpoint(path, kind, c, step, nets):
    """kind, config, step, RNG states and every state_dict in nets; rank 0 alone writes."""
    if DIST.rank == 0:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        atomic_save(dict(kind=kind, format=CHECKPOINT_FORMAT, config=dataclasses.asdict(c),
                         step=step, rng=torch.get_rng_state(), cuda_rng=cuda,
                         **{k: m.state_dict() for k, m in nets.items()}), path)


def load_checkpoint(path, kind=None):
    """A checkpoint of this script (kind 'teacher', 'student' or None for either), loaded with
    weights_only=True (tensors and plain containers only): a file from elsewhere runs no code."""
    import pickle
    if not os.path.isfile(path):
        raise UserError(f"no {kind or 'teacher or student'} checkpoint at {path}; train one or fix "
                        "the path")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} refused: it holds more than tensors and plain data "
                        f"({str(e).splitlines()[0][:100]}); swd_mini never writes such files; "
                        "do not load it") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated or "
                        "another format); delete it or retrain") from None
    if not isinstance(ck, dict) or ck.get("kind") not in ("teacher", "student"):
        raise UserError(f"{path} is not a checkpoint of swd_mini.py")
    if kind and ck["kind"] != kind:
        raise UserError(f"{path} is a {ck['kind']} checkpoint, but a {kind} is needed here")
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} was written by another version of swd_mini.py (format "
                        f"{ck.get('format', 1)}, this is {CHECKPOINT_FORMAT}); retrain it")
    return ck


def model_from_checkpoint(path, device, like=None, kind=None):
    """The sampling network of a checkpoint (a teacher's EMA, a student's generator), frozen, its
    config and kind; like: a run's config whose network it must match (else one line saying which
    flag to pass); kind: the kind it must be (teacher, student or None for either)."""
    ck = load_checkpoint(path, kind)
    known = {f.name for f in dataclasses.fields(Config)}
    c = Config(**{k: v for k, v in ck["config"].items() if k in known})
    for name in ("res", "channels", "num_classes", "patch", "hidden", "depth", "heads",
                 "mlp_ratio") if like else ():
        if getattr(c, name) != getattr(like, name):
            raise UserError(f"{path} has {name}={getattr(c, name)}, this run "
                            f"{getattr(like, name)}; pass --{name} {getattr(c, name)} or retrain")
    model = DiT.from_config(c).to(device)
    model.load_state_dict(ck["ema" if ck["kind"] == "teacher" else "gen"])
    return model.eval().requires_grad_(False), c, ck["kind"]


def resume_from(path, kind, c, nets):
    """--resume: load every state in nets and the RNG from path; returns the step to start at."""
    if not c.resume or not os.path.exists(path):
        if os.path.exists(path):
            print(f"note: {path} is replaced at the first checkpoint (--resume true continues it)")
        return 0
    ck = load_checkpoint(path, kind)
    for key, m in nets.items():
        m.load_state_dict(ck[key])
    torch.set_rng_state(ck["rng"])
    if ck["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    print(f"resumed {kind} from {path} at step {ck['step']}")
    return ck["step"]


def checkpoint_if_due(done, total, path, kind, c, nets, stop, guard):
    """A checkpoint after `done` of `total` steps, every --ckpt_every and --sample_every steps and
    when a signal asked to stop (then exit), after the finite check; the last one is the loop's."""
    due = any(n and done % n == 0 for n in (c.ckpt_every, c.sample_every))
    if DIST.any(stop.signum):  # under torchrun the ranks agree to stop at the same step
        stop.signum = stop.signum or signal.SIGTERM
    if done < total and (due or stop.signum):
        guard.check()
        save_checkpoint(path, kind, c, done, nets)
        if stop.signum:
            DIST.barrier()  # rank 0 has written the checkpoint
            print(f"\nstopped by signal {stop.signum} after step {done}; {path} holds it; continue "
                  "with the same command and --resume true", file=sys.stderr)
            sys.exit(128 + stop.signum)


class StopOnSignal:
    """SIGINT / SIGTERM ask the training loop to save at the next step boundary and exit."""

    def __enter__(self):
        self.signum, self.old = None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, lambda signum, frame: setattr(self, "signum",
                                                                                 signum))
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class JsonLog:
    """log.jsonl, one JSON object per line; rank 0 alone writes it."""

    def __init__(self, path, append):
        self.f = open(path, "a" if append else "w") if DIST.rank == 0 else None

    def write(self, **row):
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()


# ----------------------------- devices, precision, compile ----------------------------------


def get_device(name="auto"):
    """cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")


def autocast(device, precision=""):
    """bf16 autocast (--precision bf16, the default on CUDA: DMD diverges in fp16), else fp32."""
    bf16 = precision == "bf16" or (precision == "" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def frozen_copy(net, c, device):
    """A frozen DiT whose Linear layers are stored in bf16 when it runs under bf16 autocast: the
    same numbers as autocast's casts (the bias too), without re-casting every weight per call."""
    if not isinstance(net, DiT) or not (c.precision == "bf16" or (c.precision == "" and
                                                                  device.type == "cuda")):
        return net
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            m.to(torch.bfloat16)
    return net


def compiled(net, c):
    """--compile true: the DiT's forward and features through torch.compile, in place (the
    state_dict keys stay the module's own). Anything else passes through (the toy world's exact
    score is never traced). Copy a net before, not after: a deep copy of a compiled net calls the
    original."""
    if c.compile and isinstance(net, DiT):
        net.forward, net.features = static_compile(net.forward), static_compile(net.features)
    return net


def static_compile(fn):
    """torch.compile with static shapes: one graph per scale, batch shape and grad mode, under a
    recompile limit above a run's count."""
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 256
    return torch.compile(fn, dynamic=False)


LOSSES_COMPILED = {}  # loss function -> its one static_compile wrapper, shared by every caller


def compiled_loss(fn, c):
    """--compile true: a loss function through static_compile, wrapped once; else fn itself.
    Inside it the compiled networks are inlined, so a loss and its networks' calls make one graph
    (two, around the toy world's exact score, which is never traced)."""
    if c.compile and fn not in LOSSES_COMPILED:
        LOSSES_COMPILED[fn] = static_compile(fn)
    return LOSSES_COMPILED[fn] if c.compile else fn


def synchronize(device):
    """Wait for the device's queued work: a timing must not stop before the GPU does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------ data parallel under torchrun --------------------------------


@dataclass
class Ranks:
    """torchrun --nproc_per_node=N swd_mini.py ... starts N copies. Every rank draws the *global*
    batch, its noise and levels from the same seeded generators and keeps its slice (local); the
    ranks average their gradients (average) before each step. So N ranks compute what one
    process computes on the global batch, up to float rounding."""
    rank: int = 0  # this process, 0..world-1; rank 0 alone writes files
    world: int = 1  # number of processes
    local_rank: int = 0  # this process on its node: its GPU

    def join(self, c, device):
        """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world == 1:
            return device
        import atexit
        import torch.distributed as dist
        self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
        for name in ("batch", "distill_batch"):
            if getattr(c, name) % (self.world * c.accum):
                raise UserError(f"--{name} {getattr(c, name)} is the global batch: it must be "
                                f"divisible by the {self.world} ranks times --accum {c.accum}")
        return device

    def local(self, *tensors, groups=1):
        """This rank's slice of each of `groups` global batches stacked along dim 0."""
        if self.world > 1:
            tensors = tuple(t.unflatten(0, (groups, -1)).chunk(self.world, 1)[self.rank]
                            .flatten(0, 1) for t in tensors)
        return tensors if len(tensors) > 1 else tensors[0]

    def average(self, params, *losses):
        """What DistributedDataParallel does, written out (SwD calls the fake network in both
        halves, with and without its gradients, which DDP's hooks do not follow): one all-reduce of
        every gradient and of the losses, over the ranks. Returns the losses, averaged."""
        if self.world == 1:
            return losses
        import torch.distributed as dist
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.as_tensor(
            v, device=grads[0].device).detach().float().reshape(1) for v in losses])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads] + [1] * len(losses))):
            g.copy_(part.view_as(g))
        return tuple(flat[len(flat) - len(losses):].unbind())

    def any(self, flag):
        """True on every rank when flag is true on any (a stop request must be agreed on)."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([float(bool(flag))])
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


DIST = Ranks()


# -------------------------------------- dataset files ---------------------------------------
# Every reader gives (uint8 images (N, C, H, W), int64 labels (N,)), arrays or memory maps.
FMNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def read_idx_gz(path):
    """An IDX file (gzipped or not), e.g. Fashion-MNIST: 2051 images (N, H, W), 2049 labels."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    magic, n = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic == 2051:
        h, w = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
        if len(raw) != 16 + n * h * w:
            raise UserError(f"{path} holds {len(raw) - 16} pixel bytes, not {n} x {h} x {w}")
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)
    raise UserError(f"{path} is not an IDX image or label file (magic {magic})")


def load_fmnist(data_dir):
    """Fashion-MNIST train split, padded from 28 to 32 px with the background value."""
    folder = data_dir or FMNIST_DEBIAN
    for suffix in (".gz", ""):
        img, lab = (os.path.join(folder, f"train-{k}-idx{d}-ubyte{suffix}")
                    for k, d in (("images", 3), ("labels", 1)))
        if os.path.exists(img) and os.path.exists(lab):
            x, y = read_idx_gz(img), read_idx_gz(lab)
            break
    else:
        raise UserError(f"Fashion-MNIST not found in {folder}; `apt-get install "
                        "dataset-fashion-mnist` or pass --data_dir with train-*-ubyte[.gz]")
    if len(x) != len(y):
        raise UserError(f"{folder}: {len(x)} images but {len(y)} labels")
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]  # (N, 1, 32, 32); 0 is the background
    return torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_cifar10(data_dir):
    """The CIFAR-10 training set through torchvision (cifar-10-batches-py/ in data_dir)."""
    import torchvision
    root = data_dir or "data/cifar10"
    try:
        ds = torchvision.datasets.CIFAR10(root, train=True, download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 not in {root} and could not be downloaded ({type(e).__name__}); "
                        "put cifar-10-batches-py/ there or go online") from None
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # stored as NHWC
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def cached_array(folder, name, shape, fill):
    """A uint8 array (shape) and its labels cached as <folder>/<name>.npy and <name>_labels.npy:
    rank 0 fills it once (fill(array) -> labels), then every rank memory-maps it (one copy on disk,
    shared through the page cache)."""
    cache, labels = (os.path.join(folder, f"{name}{k}.npy") for k in ("", "_labels"))
    if DIST.rank == 0 and not os.path.exists(labels):
        x = np.lib.format.open_memmap(cache + ".tmp", "w+", np.uint8, shape)
        y = fill(x)
        x.flush()
        os.replace(cache + ".tmp", cache)
        with open(labels + ".tmp", "wb") as fh:  # written last: its presence marks a whole cache
            np.save(fh, np.asarray(y, dtype=np.int64))
        os.replace(labels + ".tmp", labels)
    while not os.path.exists(labels):  # other ranks wait for rank 0's copy (no collective call:
        time.sleep(1)                   # under torchrun only rank 0 runs the measuring stages)
    return np.load(cache, mmap_mode="r"), torch.from_numpy(np.load(labels))


def load_imagenet64(data_dir):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): train_data_batch_*.npz, data (N, 12288)
    uint8, channel-planar, labels 1..1000; copied once into one memory-mapped array."""
    import glob
    folder = data_dir or "data/imagenet64"
    files = sorted(glob.glob(os.path.join(folder, "train_data_batch_*.npz")))
    if not files:
        raise UserError(f"no train_data_batch_*.npz in {folder}; unzip "
                        "Imagenet64_train_part1.zip and _part2.zip there (image-net.org)")

    def fill(x):
        start, ys = 0, []
        for f in files:
            with np.load(f) as z:
                data, y = z["data"], np.asarray(z["labels"], dtype=np.int64) - 1  # 1..1000 -> 0..
            if data.shape != (len(y), 3 * 64 * 64):
                raise UserError(f"{f}: data is {data.shape}, expected ({len(y)}, 12288)")
            x[start:start + len(y)] = data.reshape(-1, 3, 64, 64)
            start, ys = start + len(y), ys + [y]
        return np.concatenate(ys)
    n = sum(len(np.load(f, mmap_mode="r")["labels"]) for f in files)
    return cached_array(folder, "imagenet64_train", (n, 3, 64, 64), fill)


def load_folder(c):
    """An image folder: a sub-folder per class (sorted), or the images themselves (--num_classes
    1). Resized and centre-cropped to --res by --workers DataLoader processes, once, into a cached
    uint8 array (in the folder, or in out_dir when it is read-only), then memory-mapped."""
    import torchvision.transforms as T
    from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
    root = c.data_dir
    if not root or not os.path.isdir(root):
        raise UserError(f"--data folder needs --data_dir naming an image folder (got {root!r})")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [(os.path.join(dp, f), k) for k, d in enumerate(classes or ["."])
             for dp, _, fs in sorted(os.walk(os.path.join(root, d))) for f in sorted(fs)
             if f.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise UserError(f"no images found under {root}")
    tf = T.Compose([T.Grayscale() if c.channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
                    T.Resize(c.res), T.CenterCrop(c.res), T.PILToTensor()])

    def fill(x):
        decode = [(tf(default_loader(p)), k) for p, k in files] if c.workers == 0 else \
            torch.utils.data.DataLoader(files, batch_size=None, num_workers=min(
                c.workers, os.cpu_count()), collate_fn=lambda f: (tf(default_loader(f[0])), f[1]))
        for j, (img, _) in enumerate(decode):
            x[j] = img.numpy()
        return [k for _, k in files]
    folder = root if os.access(root, os.W_OK) else c.out_dir
    return cached_array(folder, f".swd_cache_{c.res}px_{c.channels}ch",
                        (len(files), c.channels, c.res, c.res), fill)


def load_dataset(c):
    """uint8 images (N, C, res, res) and labels (N,) of a real-data source, checked against c."""
    loaders = dict(fmnist=lambda: load_fmnist(c.data_dir), cifar10=lambda: load_cifar10(c.data_dir),
                   imagenet64=lambda: load_imagenet64(c.data_dir), folder=lambda: load_folder(c))
    x, y = loaders[c.data]()
    if tuple(x.shape[1:]) != (c.channels, c.res, c.res):
        raise UserError(f"{c.data} images are {tuple(x.shape[1:])}; "
                        f"set --channels {x.shape[1]} --res {x.shape[-1]}")
    if int(y.min()) < 0 or int(y.max()) >= c.num_classes:
        raise UserError(f"{c.data} has labels {int(y.min())}..{int(y.max())}; labels must lie in "
                        f"0..num_classes-1: set --num_classes {int(y.max()) + 1} or fix the labels")
    return x, y


# ------------------------------ command-line flags and checks -------------------------------
STAGES = ("teacher", "distill", "sample", "eval", "spectra", "bench", "all")
EXAMPLES = """examples:
  python swd_mini.py                                   # the toy world: every stage, on a laptop
  python swd_mini.py --stage distill --teacher toy     # distil the exact toy denoiser
  python swd_mini.py --stage sample --ckpt runs/toy/student.pt --n 10000 --out_dir samples
  python swd_mini.py --preset fmnist                   # apt-get install dataset-fashion-mnist
  torchrun --nproc_per_node=8 swd_mini.py --preset imagenet64 --stage teacher"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def parse_value(kind, text):
    """A flag's text as the type of its field's default (bool, comma-separated list, int, float)."""
    if kind is bool:
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    if kind is list:
        try:
            return [float(v) if any(ch in v for ch in ".e") else int(v) for v in text.split(",")
                    if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
                from None
    value = kind(text)
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def config_sections():
    """[(section, [(field, its comment)])] read from Config's source: --help never drifts."""
    import inspect
    sections = []
    for line in inspect.getsource(Config).splitlines()[2:]:
        text = line.strip()
        if text.startswith("# "):
            sections.append((text[2:], []))
        elif ":" in text and "#" in text:
            sections[-1][1].append((text.split(":")[0], text.split("#", 1)[1].strip()))
    return sections


def make_config(argv=None):
    """Config from --preset, then every --key value / --key=value on top of it; checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = Parser(add_help=False)
    pre.add_argument("--preset", default=Config.preset)
    name = pre.parse_known_args(argv)[0].preset
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = dataclasses.replace(Config(), preset=name, **PRESETS[name])
    p = Parser(description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    for section, fields in config_sections():
        group = p.add_argument_group(section)
        for field_name, comment in fields:
            default = getattr(base, field_name)
            kind, shown = type(default), (",".join(map(str, default)) if isinstance(default, list)
                                          else default)
            group.add_argument(f"--{field_name}", type=lambda t, k=kind: parse_value(k, t),
                               default=default, metavar=kind.__name__.upper(),
                               help=f"{comment} (default: {shown})".replace("%", "%%"))
    c = Config(**vars(p.parse_args(argv)))
    c.out_dir = c.out_dir or os.path.join("runs", c.preset)
    check_config(c)
    return c


def check_config(c):
    """Reject configurations that cannot work, with one line that says what to do."""
    def need(ok, message):
        if not ok:
            raise UserError(message)

    for name, allowed in dict(stage=STAGES, data=("toy", "fmnist", "cifar10", "imagenet64",
                                                  "folder"),
                              schedule=("hand", "auto"), mmd_kernel=("linear", "rbf"),
                              fake_loss=("x0", "eps", "edm", "v"), inputs=("data", "backward"),
                              precision=("", "fp32", "bf16"), flip=("auto", "true", "false"),
                              teacher_target=("sample", "exact"), real=("data", "teacher"),
                              fake=("residual", "copy", "fitted")).items():
        need(getattr(c, name) in allowed, f"--{name} {getattr(c, name)!r} is not one of "
             f"{', '.join(a or repr(a) for a in allowed)}")
    need(min(c.res, c.patch, c.channels, c.num_classes) >= 1,
         "--res, --patch, --channels and --num_classes must be positive")
    need(c.scales == sorted(set(c.scales)) and c.scales[-1:] == [c.res] and c.scales[0] >= 1,
         f"--scales {c.scales} must rise strictly and end at --res {c.res}")
    need(not any(r % c.patch for r in c.scales), f"every scale in {c.scales} must be divisible "
         f"by --patch {c.patch}")
    need(len(c.levels) == len(c.scales) and c.levels[0] == 1.0 and c.levels[-1] > 0 and all(
        a >= b for a, b in zip(c.levels, c.levels[1:])), f"--levels {c.levels} needs one level per "
         "scale, starting at 1.0, never rising, above 0")
    need(c.hidden >= 8 and c.hidden % 4 == 0 and c.heads >= 1 and c.hidden % c.heads == 0,
         "--hidden must be a multiple of 4, at least 8, and divisible by --heads")
    need(1 <= c.feat_block <= c.depth, f"--feat_block must lie in 1..--depth ({c.depth})")
    for name in ("dmd_levels", "fake_levels", "mmd_levels"):
        v = getattr(c, name)
        need(len(v) == 2 and 0 <= v[0] <= v[1] <= 1, f"--{name} {v} must be low,high with "
             "0 <= low <= high <= 1")
    need(c.teacher_target == "sample" or c.data == "toy", "--teacher_target exact needs --data toy")
    need(c.fake != "fitted" or c.data == "toy", "--fake fitted needs --data toy")
    need(c.data != "toy" or c.num_classes <= 4, "the toy world has 1 to 4 classes (--num_classes)")
    need(c.teacher != "toy" or c.data == "toy", "--teacher toy is the exact toy-world denoiser; "
         "it needs --data toy")
    need(c.labels == "all" or all(v.strip().isdigit() and int(v) < c.num_classes for v in
                                  c.labels.split(",")), f"--labels {c.labels!r} must be all or "
         f"class numbers below --num_classes {c.num_classes}, comma-separated")
    need(c.batch % c.accum == 0 == c.distill_batch % c.accum, f"--accum {c.accum} must divide "
         f"--batch {c.batch} and --distill_batch {c.distill_batch}")
    need(c.dmd_weight + c.gan_weight + c.mmd_weight > 0, "one of --dmd_weight, --gan_weight, "
         "--mmd_weight must be positive")
    for name in ("lr", "distill_lr", "fake_lr", "sigma_data", "cfg", "weight_decay", "grad_clip",
                 "logit_std", "dmd_weight", "gan_weight", "gan_d_weight", "mmd_weight",
                 "reg_weight", "mmd_bandwidth", "schedule_margin", "mmd_fine"):
        need(getattr(c, name) >= 0, f"--{name} must not be negative")
    for name in ("ema", "class_dropout"):
        need(0 <= getattr(c, name) < 1, f"--{name} must lie in [0, 1)")
    for name in ("teacher_steps", "batch", "distill_steps", "distill_batch", "fake_updates", "n",
                 "eval_n", "eval_every_n", "eval_batch", "bench_n", "depth",
                 "log_every", "sample_steps", "accum", "real_n", "reg_n"):
        need(getattr(c, name) >= 1, f"--{name} must be at least 1")
    for name in ("eval_every", "eval_ref", "ckpt_every", "sample_every", "warmup",
                 "distill_warmup", "workers", "bench_repeats", "probe_every"):
        need(getattr(c, name) >= 0, f"--{name} must be 0 (off) or positive")


def main(argv=None):
    """Parse the flags, then run the stages; bad input: one line, exit 2 (non-finite: exit 3)."""
    try:
        c = make_config(argv)
        device = DIST.join(c, get_device(c.device))  # torchrun: join the ranks
        torch.set_float32_matmul_precision("high")
        if os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir):
            raise UserError(f"--out_dir {c.out_dir} is a file; pass a folder")
        try:
            os.makedirs(c.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out_dir {c.out_dir} cannot be created ({e.strerror}); pass "
                            "another") from None
        if c.schedule == "auto":  # levels from the data's spectrum
            f, P = rapsd(Data(c, device).batch(512, seeded(c.seed))[0].cpu())
            c = dataclasses.replace(c, levels=auto_schedule(f, P, c.scales, c.schedule_margin))
        print(f"device {device}; config:\n" + json.dumps(dataclasses.asdict(c)))
        stages = dict(teacher=train_teacher, distill=distill, sample=run_sample, eval=run_eval,
                      spectra=run_spectra, bench=run_bench)
        for stage in stages if c.stage == "all" else [c.stage]:
            if stage == "bench" and c.stage == "all" or DIST.rank > 0 and stage in (
                    "eval", "spectra", "bench"):
                continue  # all: the first five; under torchrun rank 0 alone measures
            t0 = time.time()
            stages[stage](c, device)
            print(f"stage {stage}: {time.time() - t0:.1f} s")
    except (UserError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 3)
    except KeyboardInterrupt:  # outside the training loops, which save first (StopOnSignal)
        print("\nstopped by Ctrl-C; the same command continues where it stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
