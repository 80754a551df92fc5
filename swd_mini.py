"""swd_mini.py: Scale-wise Distillation of diffusion models, small enough to read in one sitting.

Implements, at teaching scale:
  * a pixel-space DiT teacher trained with rectified flow at every scale of a schedule
    (Peebles & Xie 2023; rectified flow: Liu et al. 2022, Esser et al. 2024, logit-normal levels);
  * Scale-wise Distillation, SwD (Starodubcev et al. 2025, arXiv 2503.16397): a few-step generator
    whose steps start at low resolution and grow, trained with DMD (Yin et al. 2024), the DMD2 GAN
    head (Yin et al. 2024b) and the patch MMD loss;
  * the full-resolution few-step DMD2 student as the baseline (the same code, all scales equal).

Convention everywhere: x_t = (1 - s) x0 + s eps, s in [0, 1] (s = 1 is pure noise); networks predict
the velocity v = eps - x0, so x0_hat = x_t - s v.

    python swd_mini.py --stage teacher      # train the multi-scale teacher (toy: ~5 CPU minutes)
    python swd_mini.py --stage distill      # distil it scale-wise into a 4-step generator
    python swd_mini.py --stage sample       # a sample grid from the newest checkpoint
    python swd_mini.py --help               # every option, with its default

How to read it. PART 1 is the method, in the paper's order: config -> data -> spectral maths
(SwD section 2) -> scales, the scale-wise sampler (section 3) and its training inputs (section 4)
-> the DiT -> the teacher -> distillation: DMD, GAN and the patch loss (sections 5-6) -> sampling
-> the command-line entry. PART 2 measures it (metrics, eval, bench, the claims report, spectra
figures) and holds the plumbing (checkpoints, devices and torchrun, dataset files, flags). A reader
can stop before it.
"""
import argparse
import copy
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ==========================================================================================
#                                     PART 1: THE METHOD
# ==========================================================================================

# ------------------------------------------------------------------------------------------
#                                           Config
# ------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """What training and sampling need. PART 2 adds the measuring fields (Config)."""
    # run
    preset: str = "toy"  # named preset the other values start from (see PRESETS)
    stage: str = "all"  # teacher|distill|sample|eval|spectra|bench|report|diagnose, or all
    out_dir: str = ""  # where checkpoints, grids and log.jsonl go; "" means runs/<preset>
    seed: int = 0  # seeds torch for training and sampling
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cuda | mps | cpu
    compile: bool = False  # torch.compile the networks (slow to start, no gain on CPU)
    precision: str = ""  # bf16 | fp32 autocast; "" = bf16 on CUDA, fp32 elsewhere
    resume: bool = False  # continue training from the checkpoint in out_dir
    # data
    data: str = "toy"  # toy | fmnist | cifar10 | imagenet64 | folder
    data_dir: str = ""  # where the dataset lives; "" means the source's usual place (load_dataset)
    res: int = 32  # full image resolution (the last scale)
    channels: int = 3  # image channels
    num_classes: int = 4  # class labels; index num_classes is the CFG "null" class
    flip: str = "auto"  # random horizontal flips of data: true | false | auto (on for cifar10,
    #                     imagenet64 and folder data)
    # model: a pixel-space DiT
    patch: int = 4  # patch size; every scale must be divisible by it
    hidden: int = 128  # token width
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP width / token width
    sigma_data: float = 0.5  # data std of the EDM-style preconditioning (precondition); 0 = off
    feat_block: int = 2  # block whose tokens feed the GAN head and the patch loss (1-based)
    # the scale-wise schedule (SwD section 3)
    scales: list = field(default_factory=lambda: [8, 16, 24, 32])  # resolution per step, rising
    sigmas: list = field(default_factory=lambda: [1.0, 0.9, 0.75, 0.6])  # level per step, from 1.0
    schedule: str = "hand"  # hand: use --sigmas | auto: derive them from the data's spectrum
    schedule_margin: float = 4.0  # auto: noise power over signal above the previous scale's Nyquist
    # teacher: rectified flow at every scale
    teacher_steps: int = 1250  # optimiser steps
    batch: int = 64  # images per teacher step
    lr: float = 2e-3  # AdamW learning rate (warm-up, then cosine decay to lr/10)
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    ema: float = 0.995  # EMA decay of the teacher weights used for sampling
    logit_mean: float = 0.0  # noise levels s = sigmoid(N(logit_mean, logit_std)), as in SD3
    logit_std: float = 1.0  # spread of the logit-normal noise-level distribution
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    teacher_target: str = "sample"  # sample: flow matching | exact: the toy world's exact velocity
    # distillation (SwD sections 4-6)
    teacher: str = ""  # real score: a teacher.pt ("" = <out_dir>/teacher.pt) or "toy" (exact)
    distill_steps: int = 300  # generator updates
    distill_batch: int = 64  # images per generator / fake update
    distill_lr: float = 1e-4  # AdamW lr of the generator
    fake_lr: float = 0.0  # AdamW lr of the fake network and GAN head; 0 = distill_lr
    fake_updates: int = 5  # fake-network updates per generator update (two time-scale rule)
    fake_loss: str = "x0"  # x0: SwD's x0 loss, s uniform in fake_s | v: the teacher's flow loss
    fake_residual: bool = False  # fake score = frozen real score + a learned correction
    distill_ema: float = 0.98  # EMA decay of the generator weights used for sampling (0 = raw)
    cfg: float = 1.0  # guidance scale of the real score (1 = none; SD3.5-M used 7)
    dmd_weight: float = 1.0  # weight of the DMD loss
    gan_weight: float = 5e-3  # weight of the generator's GAN loss
    gan_d_weight: float = 1e-2  # weight of the discriminator loss inside the fake-network loss
    mmd_weight: float = 1.0  # weight of the patch MMD loss
    mmd_kernel: str = "linear"  # linear (pseudo-Huber on token means) | rbf (MMD^2, official)
    mmd_sigma: float = 0.0  # RBF bandwidth; 0 = median heuristic (official 100 suits SD3.5 only)
    mmd_pooled: bool = False  # pool tokens over the batch instead of per image (an ablation)
    dmd_s: list = field(default_factory=lambda: [0.01, 0.79])  # DMD re-noising level range
    fake_s: list = field(default_factory=lambda: [0.0, 1.0])  # fake network's training level range
    mmd_s: list = field(default_factory=lambda: [0.01, 0.6])  # patch-loss feature noise range
    scale_pick: str = "cycle"  # which scale a batch trains: cycle (step % K) | random
    full_res: bool = False  # the DMD2 baseline: every step at full resolution (same sigmas)
    # logging, checkpoints and sample grids
    log_every: int = 25  # steps between log.jsonl lines
    ckpt_every: int = 0  # steps between checkpoints (0 = only at sample_every and the end)
    sample_every: int = 500  # steps between sample grids and checkpoints (0 = only at the end)
    sample_steps: int = 32  # Euler steps of the teacher sampler
    n_samples: int = 64  # images in a sample grid


# The CPU presets end at s = 0.25, not SD3.5's 0.6: on the toy world the exact posterior mean as a
# scale-wise sampler scores FD 28.7 with these levels, 44.7 with 1, .9, .75, .6 (README).
CPU_SIZE = dict(hidden=96, teacher_steps=3000, distill_steps=500, distill_batch=32, distill_lr=1e-5,
                fake_lr=3e-4, distill_ema=0.995, sigmas=[1.0, 0.75, 0.5, 0.25])
PRESETS = {
    # seconds: for tests
    "smoke": dict(hidden=32, depth=2, heads=2, feat_block=1, teacher_steps=6, batch=8, warmup=2,
                  distill_steps=2, distill_batch=4, log_every=1, sample_every=0,
                  sample_steps=2, n_samples=8, eval_n=64, seeds=1),
    # the default: the toy world at 32 px on a laptop CPU (python swd_mini.py: ~7 min, 2 cores)
    "toy": dict(CPU_SIZE),
    # Fashion-MNIST padded to 32 px, grayscale, guided (CFG 2), at the same CPU size
    "fmnist": dict(CPU_SIZE, data="fmnist", channels=1, num_classes=10, cfg=2.0),
    # CIFAR-10 on one GPU
    "cifar10": dict(data="cifar10", num_classes=10, patch=2, hidden=384, depth=12, heads=6,
                    feat_block=6, teacher_steps=100000, batch=256, lr=3e-4, warmup=2000,
                    ema=0.9999, distill_steps=5000, distill_lr=2e-5, cfg=2.0, sample_every=5000),
    # ImageNet 64x64, class-conditional, for a few GPUs (global batches, split over the ranks):
    # DiT-B/4 sized, 256 tokens at 64 px; DMD2's ImageNet-64 distillation lr 2e-6, batch 280
    "imagenet64": dict(data="imagenet64", res=64, num_classes=1000, patch=4, hidden=768, depth=12,
                       heads=12, feat_block=6, scales=[16, 32, 48, 64],
                       sigmas=[1.0, 0.75, 0.5, 0.25],
                       teacher_steps=400000, batch=512, lr=1e-4, warmup=5000, ema=0.9999,
                       distill_steps=20000, distill_batch=256, distill_lr=2e-6, fake_lr=2e-6,
                       cfg=1.5, sample_every=10000, ckpt_every=2000),
}


# ------------------------------------------------------------------------------------------
#                                            Data
# ------------------------------------------------------------------------------------------
# Batches are float images in [-1, 1] at the full resolution: the toy world drawn on the fly, or a
# dataset held in memory as uint8 (the file readers are plumbing, in PART 2).


class Data:
    """Infinite source of (x in [-1, 1] (B, C, res, res), y (B,)) batches on the device."""

    def __init__(self, c, device):
        self.device, self.res, self.toy = device, c.res, None
        self.flip = c.flip == "true" or (c.flip == "auto" and c.data in ("cifar10", "imagenet64",
                                                                          "folder"))
        if c.data == "toy":
            from toy_teacher import ToyTeacher
            self.toy = ToyTeacher(res=c.res, num_classes=c.num_classes, channels=c.channels)
        else:
            self.x, self.y = load_dataset(c)

    def batch(self, n, generator=None):
        if self.toy is not None:
            x, y = self.toy.sample(n, generator=generator)
        else:
            i = torch.randint(len(self.y), (n,), generator=generator)
            x, y = torch.as_tensor(self.x[i.numpy()]).float() / 127.5 - 1, self.y[i]
            if self.flip:  # mirror a random half of the batch left-right; labels stay
                mirror = torch.rand(n, generator=generator) < 0.5
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x.to(self.device), y.to(self.device)


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


def noised(x0, s, eps):
    """x_t = (1 - s) x0 + s eps, s (B,) or a float."""
    s = torch.as_tensor(s, device=x0.device, dtype=x0.dtype).reshape(-1, 1, 1, 1)
    return (1 - s) * x0 + s * eps


def to_x0(x_t, s, v):
    """x0_hat = x_t - s v: the clean image a velocity v predicts."""
    s = torch.as_tensor(s, device=x_t.device, dtype=x_t.dtype).reshape(-1, 1, 1, 1)
    return x_t - s * v


def step_scales(c, full_res=None):
    """Resolution of each sampling step: c.scales, or the full resolution K times (DMD2)."""
    full = c.full_res if full_res is None else full_res
    return [c.res] * len(c.scales) if full else c.scales


@torch.no_grad()
def scale_wise_sample(denoise, noise, scales, sigmas, generator=None, return_trajectory=False):
    """Scale-wise sampling (SwD section 3, Algorithm 1): denoise(x, s) -> x0_hat at x's resolution.

    noise: (B, C, r_1, r_1) standard normal; scales r_1 < ... < r_K; sigmas s_1 = 1 > ... > s_K.
    With all scales equal this is the full-resolution few-step (DMD2) sampler. Returns x0_hat
    (B, C, r_K, r_K), and with return_trajectory every step's x0_hat.
    """
    x, traj = noise, []  # s_1 = 1: the first step's input is pure noise at r_1
    for i, s in enumerate(sigmas):
        x0_hat = denoise(x, s)  # 1. one generator call at resolution r_i
        traj.append(x0_hat)
        if i + 1 < len(scales):
            r = scales[i + 1]  # 2. upsample the *clean* prediction (bicubic) to r_{i+1}
            up = x0_hat if x0_hat.shape[-1] == r else F.interpolate(
                x0_hat, size=(r, r), mode="bicubic", align_corners=False)
            eps = torch.randn(up.shape, generator=generator).to(up)  # 3. fresh noise at r_{i+1}
            x = (1 - sigmas[i + 1]) * up + sigmas[i + 1] * eps  # 4. re-noise to s_{i+1}
    return (x0_hat, traj) if return_trajectory else x0_hat


def scale_wise_inputs(x, i, scales, sigmas, eps=None):
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
    return (1 - sigmas[i]) * prev + sigmas[i] * eps, target


# ------------------------------------------------------------------------------------------
#                                  Model: a pixel-space DiT
# ------------------------------------------------------------------------------------------


def timestep_embedding(s, dim, max_period=10000.0):
    """Sinusoidal embedding (B, dim) of noise levels s (B,), scaled to [0, 1000] as in DiT."""
    half = dim // 2
    steps = torch.arange(half, device=s.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = 1000 * s.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


@functools.lru_cache(maxsize=None)
def pos_embedding_2d(n, dim, base, device):
    """Sin-cos position embedding (n*n, dim) for an n x n token grid, relative to the image.

    A token's coordinate is (index + 0.5) / n * base, base = tokens per side at full resolution, so
    the token covering a given part of the image gets the same embedding at every scale.
    """
    coord = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * base
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    gy, gx = torch.meshgrid(coord, coord, indexing="ij")
    ay, ax = gy.reshape(-1, 1) * omega, gx.reshape(-1, 1) * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], -1)


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


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the condition sets shift, scale and gate of each half."""

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

    def forward(self, x, cond):  # x (B, N, D), cond (B, D)
        B, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond)[:, None].chunk(6, -1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))  # (B, N, 3 D)
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


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

    def embed(self, x, s, y):
        """Tokens (B, N, D), condition (B, D) and precondition's c_skip, c_out ((0, 1) when off)."""
        s = torch.as_tensor(s, device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)
        c_in, c_skip, c_out = precondition(s, self.sigma_data) if self.sigma_data else (1, 0, 1)
        p = self.patch
        pos_fn = pos_embedding_2d.__wrapped__ if torch.compiler.is_compiling() else pos_embedding_2d
        pos = pos_fn(x.shape[-1] // p, self.hidden, self.res // p, x.device)  # compile: no cache
        cond = self.s_embed(timestep_embedding(s, 256)) + self.y_embed(y)
        tokens = self.patch_in(patchify(x * c_in, self.patch)) + pos  # (B, N, D)
        return tokens, cond, c_skip, c_out

    def forward(self, x, s, y, feat_block=None, skip=True):
        """Velocity (B, C, H, W); with feat_block=k also the tokens (B, N, D) after block k.
        skip=False leaves out c_skip x_t (the residual fake score's correction, fake_velocity)."""
        B, C, H, W = x.shape
        h, cond, c_skip, c_out = self.embed(x, s, y)
        feats = None
        for i, block in enumerate(self.blocks, 1):
            h = block(h, cond)
            feats = h if i == feat_block else feats
        shift, scale = self.ada_out(cond)[:, None].chunk(2, -1)
        v = unpatchify(self.out(modulate(self.norm_out(h), shift, scale)), self.patch, C, H, W)
        if self.sigma_data:  # v = c_skip x_t + c_out F: the network predicts the unexplained part
            v = c_skip * x + c_out * v if skip else c_out * v
        return v if feat_block is None else (v, feats)

    def features(self, x, s, y, k):
        """Tokens (B, N, D) after block k only: the blocks after k are not run."""
        h, cond, _, _ = self.embed(x, s, y)
        for block in self.blocks[:k]:
            h = block(h, cond)
        return h


# ------------------------------------------------------------------------------------------
#                      Teacher: rectified flow, trained at every scale
# ------------------------------------------------------------------------------------------


def flow_matching_loss(model, x0, y, s, eps):
    """Rectified flow: || v_theta(x_t, s, y) - (eps - x0) ||^2, x_t = (1-s) x0 + s eps."""
    return F.mse_loss(model(noised(x0, s, eps), s, y), eps - x0)


def logit_normal(n, mean, std, device, generator=None):
    """Noise levels s = sigmoid(N(mean, std)) (SD3): most training where few steps need it."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator).to(device))


def drop_labels(y, p, null, generator=None):
    """Classifier-free guidance training: each label becomes the null class with probability p."""
    drop = torch.rand(y.shape, generator=generator).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null), y)


def lr_at(step, c, total, base):
    """Linear warm-up, then cosine decay to base/10."""
    if step < c.warmup:
        return base * (step + 1) / c.warmup
    t = (step - c.warmup) / max(1, total - c.warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def teacher_iteration(step, fwd, model, ema, opt, data, c, device):
    """One teacher update: a batch at scale r = scales[step % K], rectified flow, AdamW, EMA.

    fwd is the model or its torch.compile wrapper. Returns (loss, grad norm, r); tensors, no sync.
    """
    for g in opt.param_groups:
        g["lr"] = lr_at(step, c, c.teacher_steps, c.lr)
    r = c.scales[step % len(c.scales)]
    x, y = data.batch(c.batch)  # the global batch: under torchrun every rank draws the same one
    x0 = downsample(x, r)
    s = logit_normal(c.batch, c.logit_mean, c.logit_std, device)
    eps = torch.randn_like(x0)
    y = drop_labels(y, c.class_dropout, c.num_classes)  # toy world: the null label = unconditional
    x0, y, s, eps = local(x0, y, s, eps)  # this rank's slice (all of it on one process; PART 2)
    with autocast(device, c.precision):
        if c.teacher_target == "exact":  # the toy world's exact velocity: flow matching's minimiser
            x_t = noised(x0, s, eps)
            v = data.toy.velocity(x_t.cpu().double(), s.cpu(), y.cpu()).float().to(device)
            loss = F.mse_loss(fwd(x_t, s, y), v)
        else:
            loss = flow_matching_loss(fwd, x0, y, s, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    loss, = average_gradients(model.parameters(), loss)  # over the ranks (PART 2)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    check_finite(step, loss=loss, grad_norm=gnorm)
    opt.step()
    ema_update(ema, model, c.ema)
    return loss.detach(), gnorm, r


def train_teacher(c, device):
    """Multi-scale rectified-flow teacher: each batch at one scale of c.scales (cycled); EMA."""
    from tqdm import tqdm
    torch.manual_seed(c.seed)
    data = Data(c, device)
    model = DiT.from_config(c).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    nets = dict(model=model, ema=ema, opt=opt)
    path = os.path.join(c.out_dir, "teacher.pt")
    start = resume_from(path, "teacher", c, nets)
    fwd = torch.compile(model) if c.compile else model
    log = JsonLog(os.path.join(c.out_dir, "log.jsonl"), append=c.resume)
    curve = LearningCurve(c, data.toy, log, "teacher")  # PART 2: exact FD rows, --eval_every

    def sampler(y, g):
        return teacher_sampler(ema, c, device, c.sample_steps, y.to(device), g)

    bar = tqdm(range(start, c.teacher_steps), initial=start, total=c.teacher_steps, desc="teacher",
               dynamic_ncols=True, disable=DIST.rank > 0)
    t0, seen = time.time(), 0
    with StopOnSignal() as stop:
        for step in bar:
            curve(step, sampler)
            loss, gnorm, r = teacher_iteration(step, fwd, model, ema, opt, data, c, device)
            seen += c.batch
            if step % c.log_every == 0 or step == c.teacher_steps - 1:
                ips = seen / (time.time() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{ips:.0f}", res=r)
                log.write(stage="teacher", step=step, res=r, loss=loss.item(),
                          grad_norm=gnorm.item(), img_per_s=ips, world_size=DIST.world)
            done = step + 1
            if c.sample_every and done % c.sample_every == 0 and done < c.teacher_steps:
                save_teacher_grid(ema, c, device, f"{c.out_dir}/teacher_{done:06d}.png")
            checkpoint_if_due(done, c.teacher_steps, path, "teacher", c, nets, stop)
    curve(c.teacher_steps, sampler, last=True)
    save_checkpoint(path, "teacher", c, c.teacher_steps, nets)
    barrier()  # under torchrun: every rank waits for rank 0's checkpoint
    save_teacher_grid(ema, c, device, os.path.join(c.out_dir, "teacher_samples.png"))
    print(f"wrote {path} and {os.path.join(c.out_dir, 'teacher_samples.png')}")
    return ema


# ------------------------------------------------------------------------------------------
#     Distillation (SwD sections 5-6): DMD with a fake score, a GAN head, the patch loss
# ------------------------------------------------------------------------------------------
# The losses first, each a pure function; then the two halves of one iteration; then the loop.


def dmd_loss(x0_hat, mu_real, mu_fake, s=None):
    """DMD generator loss (Yin et al. 2024, eq. 7; SwD section 5); all images (B, C, H, W).

    x0_hat: the generator's output; mu_real, mu_fake: the real and fake scores' x0 estimates from
    x0_hat re-noised at s (B,). p_real = x0_hat - mu_real, p_fake = x0_hat - mu_fake, and
    g = (p_real - p_fake) / mean_CHW |p_real| per sample. loss = 0.5 mse(x0_hat, sg(x0_hat - w g)),
    so d loss / d x0_hat = w g / numel, with w = 1 - s as in the official SwD code (its gradient
    reaches x0_hat through x_s = (1 - s) x0_hat + s eps); w = 1 when s is None (DMD as written).
    """
    p_real, p_fake = x0_hat - mu_real, x0_hat - mu_fake
    norm = p_real.abs().mean((1, 2, 3), keepdim=True)
    g = torch.nan_to_num((p_real - p_fake) / norm).detach()
    if s is not None:
        g = (1 - s).reshape(-1, 1, 1, 1) * g
    return 0.5 * F.mse_loss(x0_hat, (x0_hat - g).detach())


def gan_generator_loss(logits_fake):
    """Non-saturating generator loss softplus(-D(fake)) (DMD2, section 4.2)."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator_loss(logits_real, logits_fake):
    """softplus(D(fake)) + softplus(-D(real)) (DMD2, section 4.2)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def patch_mmd(feat_fake, feat_real, kernel="linear", sigma=0.0, pooled=False, c=1e-3):
    """Patch distribution matching (SwD section 6): MMD between token features of fake and real.

    feat_fake, feat_real: (B, N, D) tokens of generated image b and of *its own* real target b,
    from the same network and block, noised with the same eps at the same level. Per image
    (default) the N tokens of image b form one sample set; pooled=True makes one set of B*N tokens.
      linear: MMD with k(a, b) = a.b is |mean(a) - mean(b)|^2; SwD applies a pseudo-Huber
              sqrt(d^2 + c^2) - c to each feature's mean difference d and averages;
      rbf:    MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), as the official code computes it:
              within-set sums without the diagonal over N(N-1), the cross sum over all N^2 pairs.
              sigma <= 0: the median heuristic, sigma = median token distance (per call).
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
    if sigma <= 0:  # median over all pairs of both sets, no gradient through the bandwidth
        sigma = torch.cat([d_xx, d_yy, d_xy], -1).detach().median().clamp(min=1e-12).sqrt()
    k_xx, k_yy, k_xy = (torch.exp(-d / (2 * sigma ** 2)) for d in (d_xx, d_yy, d_xy))
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


def guided_velocity(model, x, s, y, w):
    """Classifier-free guidance v_u + w (v_c - v_u); w = 1 is the conditional model alone."""
    v_c = model(x, s, y)
    if w == 1.0:
        return v_c
    v_u = model(x, s, torch.full_like(y, model.num_classes))
    return v_u + w * (v_c - v_u)


def uniform(n, lo_hi, device):
    lo, hi = lo_hi
    return (lo + (hi - lo) * torch.rand(n)).to(device)


def load_real_score(c, device):
    """The frozen teacher: the exact toy denoiser, or a trained DiT (EMA weights)."""
    if c.teacher == "toy":
        from toy_teacher import ToyScore, ToyTeacher
        return ToyScore(ToyTeacher(res=c.res, num_classes=c.num_classes, channels=c.channels))
    path = c.teacher or os.path.join(c.out_dir, "teacher.pt")
    if not os.path.exists(path):
        raise UserError(f"no teacher at {path}; train one with `python swd_mini.py --stage teacher "
                        f"--preset {c.preset} --out_dir {c.out_dir}` or pass --teacher PATH or toy")
    model, teacher_c = model_from_checkpoint(load_checkpoint(path, "teacher"), "ema", device)
    check_same_network(path, teacher_c, c)
    return model


@dataclass
class Student:
    """What distillation trains (SwD section 5), each network copied from the teacher."""
    gen: nn.Module  # the few-step generator G: x_t at scale r_i -> velocity, trained
    gen_ema: nn.Module  # EMA of G, used for sampling
    fake: nn.Module  # the fake score: a denoiser of G's own samples, trained alongside
    head: nn.Module  # GAN discriminator head on the fake network's block tokens
    opt_gen: torch.optim.Optimizer  # AdamW of G
    opt_fake: torch.optim.Optimizer  # AdamW of the fake network and the head

    def state(self):
        """Everything a checkpoint keeps, by name (gen_ema is what sampling loads)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def make_student(c, device, init):
    """Generator, EMA, fake network (copies of init) and a fresh GAN head, with their optimisers."""
    gen, fake = (copy.deepcopy(init).train().requires_grad_(True) for _ in range(2))
    if c.fake_residual:  # the fake network learns a correction to the real score: 0 at the start
        nn.init.zeros_(fake.out.weight)
        nn.init.zeros_(fake.out.bias)
    head = GANHead(c.hidden).to(device)
    adamw = dict(betas=(0.9, 0.999), weight_decay=1e-2)
    return Student(gen=gen, gen_ema=copy.deepcopy(init).eval().requires_grad_(False), fake=fake,
                   head=head, opt_gen=torch.optim.AdamW(gen.parameters(), lr=c.distill_lr, **adamw),
                   opt_fake=torch.optim.AdamW(list(fake.parameters()) + list(head.parameters()),
                                              lr=c.fake_lr or c.distill_lr, **adamw))


def fake_velocity(fake, real, x, s, y, c, feat_block=None, v_real=None):
    """Velocity of the fake score (G's own distribution), and block tokens if feat_block is set.

    c.fake_residual: v_fake = v_real + delta(x), v_real the frozen (guided) real score, delta the
    fake network; where G matches the data the ideal delta is exactly 0 (measured on the toy world:
    no gain at this size; README). Otherwise (DMD, DMD2, the default): the fake network alone.
    """
    if not c.fake_residual:
        return fake(x, s, y, feat_block=feat_block)
    out = fake(x, s, y, feat_block=feat_block, skip=False)  # the correction delta (and tokens)
    delta, feats = out if feat_block else (out, None)
    if v_real is None:
        with torch.no_grad():
            v_real = guided_velocity(real, x, s, y, c.cfg)
    v = v_real.to(delta.dtype) + delta
    return (v, feats) if feat_block else v


def generate(gen, x, y, i, c, device):
    """One generator call at step i on training inputs from real images x (SwD section 4), the
    global batch. Returns this rank's (x0_hat, target, y), images (B, C, r_i, r_i)."""
    x_t, target = scale_wise_inputs(x, i, step_scales(c), c.sigmas)
    x_t, target, y = local(x_t, target, y)
    with autocast(device, c.precision):
        x0_hat = to_x0(x_t, c.sigmas[i], gen(x_t, c.sigmas[i], y))
    return x0_hat.float(), target, y


def fake_score_step(student, real, data, c, i, device, step=0):
    """The fake half of an iteration (DMD2's two time-scale rule): c.fake_updates updates of the
    fake network, each on a fresh batch of G's samples at scale i,
        L_fake = || x0_fake(x_s) - x0 ||^2 (SwD: s uniform in fake_s)   or   || v - (eps - x0) ||^2,
    plus the discriminator, L_D = softplus(D(fake)) + softplus(-D(real)) on block tokens.
    Returns the last (L_fake, L_D)."""
    fake, head, B, k = student.fake, student.head, c.distill_batch, c.feat_block
    fake.requires_grad_(True)
    for _ in range(c.fake_updates):
        x, y = data.batch(B)
        with torch.no_grad():
            x0_fake, target, y = generate(student.gen, x, y, i, c, device)
        if c.fake_loss == "x0":
            s = local(uniform(B, c.fake_s, device))
        else:  # "v": the teacher's own loss and levels
            s = local(logit_normal(B, c.logit_mean, c.logit_std, device))
        eps = global_noise(x0_fake, B)
        with autocast(device, c.precision):
            x_s = noised(x0_fake, s, eps)
            v, feat_fake = fake_velocity(fake, real, x_s, s, y, c, feat_block=k)
            if c.fake_loss == "x0":
                loss_fake = F.mse_loss(to_x0(x_s, s, v), x0_fake)
            else:
                loss_fake = F.mse_loss(v, eps - x0_fake)
            loss_d = torch.zeros((), device=device)
            if c.gan_weight > 0:
                feat_real = fake.features(noised(target, s, eps), s, y, k)
                loss_d = gan_discriminator_loss(head(feat_real), head(feat_fake))
            loss = loss_fake + c.gan_d_weight * loss_d
        student.opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        params = [*fake.parameters(), *head.parameters()]
        loss_fake, loss_d = average_gradients(params, loss_fake, loss_d)  # over the ranks
        norm = torch.nn.utils.clip_grad_norm_(params, 10.0)
        check_finite(step, fake_loss=loss_fake, disc_loss=loss_d, fake_grad_norm=norm)
        student.opt_fake.step()
    return loss_fake.detach(), loss_d.detach()


def generator_step(student, real, data, c, i, device, step=0):
    """The generator half of an iteration at scale i, with the fake network and head frozen:
        L_G = w_dmd L_DMD (DMD eq. 7, dmd_loss) + w_gan softplus(-D(x_s)) (DMD2)
              + w_mmd MMD(tokens of noised x0_hat, tokens of its noised real target) (SwD eq. 6),
    then one AdamW step of G and its EMA. Returns the loss terms (tensors)."""
    gen, fake, head, B, k = student.gen, student.fake, student.head, c.distill_batch, c.feat_block
    fake.requires_grad_(False)
    x, y = data.batch(B)
    x0_hat, target, y = generate(gen, x, y, i, c, device)
    terms, total = {}, torch.zeros((), device=device)
    with autocast(device, c.precision):
        if c.dmd_weight > 0 or c.gan_weight > 0:
            s = local(uniform(B, c.dmd_s, device))  # re-noise the generated images (DMD)
            x_s = noised(x0_hat, s, global_noise(x0_hat, B))
            with torch.no_grad():
                v_real = guided_velocity(real, x_s, s, y, c.cfg)
                mu_real = to_x0(x_s, s, v_real).float()
                v_fake = fake_velocity(fake, real, x_s, s, y, c, v_real=v_real)
                mu_fake = to_x0(x_s, s, v_fake).float()
            if c.dmd_weight > 0:
                terms["dmd"] = dmd_loss(x0_hat, mu_real, mu_fake, s)
                total = total + c.dmd_weight * terms["dmd"]
            if c.gan_weight > 0:
                terms["gan"] = gan_generator_loss(head(fake.features(x_s, s, y, k)))
                total = total + c.gan_weight * terms["gan"]
        if c.mmd_weight > 0:
            s = local(uniform(B, c.mmd_s, device))
            eps = global_noise(x0_hat, B)  # the same eps and level for generated and real tokens
            with torch.no_grad():
                feat_real = fake.features(noised(target, s, eps), s, y, k)
            feat_gen = fake.features(noised(x0_hat, s, eps), s, y, k)
            terms["mmd"] = patch_mmd(feat_gen.float(), feat_real.float(), c.mmd_kernel,
                                     c.mmd_sigma, c.mmd_pooled)
            total = total + c.mmd_weight * terms["mmd"]
    student.opt_gen.zero_grad(set_to_none=True)
    total.backward()
    terms = dict(zip(terms, average_gradients(gen.parameters(), *terms.values())))
    norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), 10.0)
    check_finite(step, **terms, generator_grad_norm=norm)
    student.opt_gen.step()
    ema_update(student.gen_ema, gen, c.distill_ema)
    return {name: v.detach() for name, v in terms.items()}


def distill_iteration(student, real, data, c, i, device, step=0):
    """One SwD iteration at scale index i (DMD2 when c.full_res): fake half, then generator half."""
    loss_fake, loss_d = fake_score_step(student, real, data, c, i, device, step)
    terms = generator_step(student, real, data, c, i, device, step)
    return dict(terms, fake=loss_fake, disc=loss_d)


def distill(c, device):
    """SwD (or, with --full_res, full-resolution DMD2): generator, fake network, GAN head."""
    from tqdm import tqdm
    torch.manual_seed(c.seed)
    data = Data(c, device)
    real = load_real_score(c, device)
    init = real if c.teacher != "toy" else init_network_for_toy(c, device)  # PART 2: toy start
    student = make_student(c, device, init)
    scales, nets = step_scales(c), student.state()
    path = os.path.join(c.out_dir, "student.pt")
    start = resume_from(path, "student", c, nets)
    log = JsonLog(os.path.join(c.out_dir, "log.jsonl"), append=True)
    curve = LearningCurve(c, data.toy, log, "student")  # PART 2: exact FD rows, --eval_every

    def sampler(y, g):
        return student_sampler(student.gen_ema, c, device, y.to(device), g)

    bar = tqdm(range(start, c.distill_steps), initial=start, total=c.distill_steps, desc="distill",
               dynamic_ncols=True, disable=DIST.rank > 0)
    with StopOnSignal() as stop:
        for step in bar:
            curve(step, sampler)
            K = len(scales)
            i = step % K if c.scale_pick == "cycle" else int(torch.randint(K, (1,)))
            terms = distill_iteration(student, real, data, c, i, device, step)
            if step % c.log_every == 0 or step == c.distill_steps - 1:
                row = {name: round(v.item(), 5) for name, v in terms.items()}
                bar.set_postfix(res=scales[i], **row)
                log.write(stage="distill", step=step, res=scales[i], world_size=DIST.world, **row)
            done = step + 1
            if c.sample_every and done % c.sample_every == 0 and done < c.distill_steps:
                save_student_grid(student.gen_ema, c, device, f"{c.out_dir}/student_{done:06d}.png")
            checkpoint_if_due(done, c.distill_steps, path, "student", c, nets, stop)
    curve(c.distill_steps, sampler, last=True)
    save_checkpoint(path, "student", c, c.distill_steps, nets)
    barrier()
    save_student_grid(student.gen_ema, c, device, os.path.join(c.out_dir, "student_samples.png"))
    print(f"wrote {path} and {os.path.join(c.out_dir, 'student_samples.png')}")
    return student.gen_ema


# ------------------------------------------------------------------------------------------
#                                          Sampling
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def euler_sample(velocity, noise, steps, return_trajectory=False):
    """Probability-flow ODE dx/ds = v(x, s) by Euler from s = 1 (noise) to s = 0 (data).

    velocity(x, s) -> v; noise (B, C, H, W). Uniform grid s_i = 1 - i/steps.
    """
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x, traj = noise, [noise]
    for i in range(steps):
        v = velocity(x, float(s[i]))  # 1. velocity at the current point
        x = x + (s[i + 1] - s[i]).item() * v  # 2. step along it to the next noise level
        traj.append(x)
    return (x, traj) if return_trajectory else x


def teacher_sampler(model, c, device, steps, y, generator=None):
    """Teacher N-step Euler with CFG at full resolution. Returns (B, C, R, R)."""
    noise = torch.randn(len(y), c.channels, c.res, c.res, generator=generator).to(device)
    with autocast(device, c.precision):
        x = euler_sample(lambda x, s: guided_velocity(model, x, s, y, c.cfg), noise, steps)
    return x.float()


def student_sampler(gen, c, device, y, generator=None, full_res=None, return_trajectory=False):
    """The distilled generator: scale-wise (or full-resolution) few-step sampling, no CFG."""
    scales = step_scales(c, full_res)
    noise = torch.randn(len(y), c.channels, scales[0], scales[0], generator=generator).to(device)
    with autocast(device, c.precision):
        out = scale_wise_sample(lambda x, s: to_x0(x, s, gen(x, s, y)).float(), noise, scales,
                                c.sigmas, generator, return_trajectory)
    return out


def grid_labels(n, num_classes, device):
    return (torch.arange(n) % num_classes).to(device)


def save_grid(x, path, nrow=None):
    """Images in [-1, 1] as a PNG grid, nrow per row (default: a square)."""
    from torchvision.utils import save_image
    nrow = nrow or int(math.sqrt(len(x)))
    save_image((x.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=1)


def save_teacher_grid(model, c, device, path):
    if DIST.rank > 0:  # under torchrun rank 0 alone writes files
        return
    y = grid_labels(c.n_samples, c.num_classes, device)
    g = torch.Generator().manual_seed(c.seed)
    save_grid(teacher_sampler(model, c, device, c.sample_steps, y, g), path)


def save_student_grid(gen, c, device, path, rows=8):
    """One row per sample, one column per scale-wise step (its x0_hat, upsampled to full size)."""
    if DIST.rank > 0:
        return
    g = torch.Generator().manual_seed(c.seed)
    y = grid_labels(rows, c.num_classes, device)
    _, traj = student_sampler(gen, c, device, y, g, return_trajectory=True)
    cols = torch.stack([upsample(t.float(), c.res) for t in traj], 1)  # (rows, K, C, R, R)
    save_grid(cols.reshape(-1, c.channels, c.res, c.res), path, nrow=len(traj))


def run_sample(c, device):
    """--stage sample: a grid from the student checkpoint if there is one, else from the teacher."""
    g = torch.Generator().manual_seed(c.seed)
    for kind, weights in (("student", "gen_ema"), ("teacher", "ema")):
        path = os.path.join(c.out_dir, f"{kind}.pt")
        if os.path.exists(path):
            net, net_c = model_from_checkpoint(load_checkpoint(path, kind), weights, device)
            y = grid_labels(c.n_samples, net_c.num_classes, device)
            x = student_sampler(net, net_c, device, y, g) if kind == "student" else \
                teacher_sampler(net, net_c, device, c.sample_steps, y, g)
            out = os.path.join(c.out_dir, f"samples_{kind}.png")
            save_grid(x, out)
            print(f"wrote {out}")
            return
    raise UserError(f"no teacher.pt or student.pt in {c.out_dir}; run --stage teacher first")


# ------------------------------------------------------------------------------------------
#                                     Command-line entry
# ------------------------------------------------------------------------------------------


def main(argv=None):
    """Parse the flags (make_config, PART 2), then run the stages; bad input: one line, exit 2."""
    try:
        c = make_config(argv)
        device = setup_distributed(c, get_device(c.device))  # torchrun: join the ranks (PART 2)
        torch.set_float32_matmul_precision("high")
        prepare_out_dir(c.out_dir)
        c = resolve_schedule(c, device)  # --schedule auto: levels from the spectrum (PART 2)
        print(f"device {device}; config:\n" + json.dumps(dataclasses.asdict(c)))
        stages = dict(teacher=train_teacher, distill=distill, sample=run_sample, eval=run_eval,
                      spectra=run_spectra, bench=run_bench, report=run_report,
                      diagnose=run_diagnose)
        for stage in (["teacher", "distill", "sample", "eval", "spectra"] if c.stage == "all"
                      else [c.stage]):
            if DIST.rank > 0 and stage not in ("teacher", "distill"):
                continue  # under torchrun only training is shared; rank 0 measures
            t0 = time.time()
            stages[stage](c, device)
            print(f"stage {stage}: {time.time() - t0:.1f} s")
    except (UserError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 3)


# ==========================================================================================
#                PART 2: MEASURING IT (a reader of the method can stop here)
# ==========================================================================================
# Exact metrics on the toy world and dataset metrics elsewhere; --stage eval, bench, report,
# diagnose and spectra; then the plumbing: checkpoints, dataset files, command-line flags.


@dataclass
class Config(TrainConfig):
    """TrainConfig plus the fields that only measuring reads."""
    eval_every: int = 0  # toy world: steps between exact-FD rows of the EMA model in log.jsonl
    eval_every_n: int = 500  # samples per --eval_every row (the matching noise floor is logged too)
    eval_n: int = 2000  # samples per row of the evaluation tables
    eval_ref: int = 0  # reference (data) images for the metrics; 0 means eval_n
    fid: bool = True  # add FID when torch-fidelity or clean-fid is installed (else a notice)
    eval_batch: int = 500  # images per sampling call in eval (its time per image is measured)
    bench_n: int = 256  # images per timed sampling batch in bench
    bench_repeats: int = 5  # timed repeats per bench number, after a warm-up: median, min, max
    seeds: int = 3  # report: seeds of each main distillation row; claims use the means
    readme: str = "README.md"  # report: README (next to this script) whose claims block it rewrites


class LearningCurve:
    """--eval_every on the toy world: exact FD and mode KL of the EMA model as log.jsonl rows
    {"stage": "eval", "of", "step", "fd", "mode_kl", "seconds", "floor", "n"}; seconds count
    training only."""

    def __init__(self, c, toy, log, of):
        self.c, self.toy, self.log, self.of = c, toy, log, of
        self.every, self.n = getattr(c, "eval_every", 0), getattr(c, "eval_every_n", 500)
        self.on = self.every > 0 and toy is not None and DIST.rank == 0
        self.floor = toy.noise_floor(self.n, seed=c.seed + 7)["fd"] if self.on else None
        self.t0, self.spent = time.time(), 0.0

    def __call__(self, step, sampler, last=False):
        """sampler(y, generator) -> images; at step 0, every eval_every steps and the last step."""
        if not self.on or (step % self.every and not last):
            return
        t = time.time()
        y = grid_labels(self.n, self.toy.num_classes, "cpu")
        x = sampler(y, torch.Generator().manual_seed(self.c.seed + 8))
        m = self.toy.evaluate(x.float().cpu())
        self.log.write(stage="eval", of=self.of, step=step, fd=m["fd"], mode_kl=m["mode_kl"],
                       seconds=t - self.t0 - self.spent, floor=self.floor, n=self.n)
        self.spent += time.time() - t
        return m


def init_network_for_toy(c, device):
    """--teacher toy: the generator and fake network start from a DiT regressed onto the exact
    velocity (the teacher loop with the exact target: flow matching's minimiser, no target
    variance). Cached as <out_dir>/toy_init.pt."""
    path = os.path.join(c.out_dir, "toy_init.pt")
    if not os.path.exists(path):
        init_c = dataclasses.replace(c, teacher_target="exact", sample_every=0, ckpt_every=0,
                                     resume=False, out_dir=os.path.join(c.out_dir, "toy_init"))
        if hasattr(init_c, "eval_every"):
            init_c.eval_every = 0
        os.makedirs(init_c.out_dir, exist_ok=True)
        train_teacher(init_c, device)
        os.replace(os.path.join(init_c.out_dir, "teacher.pt"), path)
    return model_from_checkpoint(load_checkpoint(path, "teacher"), "ema", device)[0]



# ------------------------------------------------------------------------------------------
#                                          Metrics
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def denoising_error(model, toy, r, s, n, device, seed=0, precision=""):
    """x0-MSE of the model and of the exact (Bayes-optimal) denoiser on the same noisy inputs."""
    g = torch.Generator().manual_seed(seed)
    x0, y = toy.sample(n, r, generator=g)
    x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    exact = toy.denoise(x_t.double(), s, y).float()
    with autocast(device, precision):
        pred = to_x0(x_t.to(device), s, model(x_t.to(device), s, y.to(device))).float().cpu()
    return F.mse_loss(pred, x0).item(), F.mse_loss(exact, x0).item()


def pyramid_blur(x):
    """The pyramid's low-pass: binomial [1, 4, 6, 4, 1] / 16 along each axis, reflected edges."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 256).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def laplacian_pyramid(x, min_res=8):
    """Laplacian pyramid (Burt & Adelson 1983), finest band first, the low-pass at min_res last.

    Each band is x minus its blurred, subsampled half-size copy expanded back (zero insertion, the
    same blur with gain 4), as in Karras et al. 2018. Returns [(res, band (B, C, res, res))].
    """
    levels = []
    while x.shape[-1] > min_res:
        small = pyramid_blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = small
        levels.append((x.shape[-1], x - 4 * pyramid_blur(up)))
        x = small
    return levels + [(x.shape[-1], x)]


def patch_descriptors(x, per_image, size=7, generator=None):
    """per_image random size x size neighbourhoods of every image, flat: (B per_image, C size^2)."""
    B, C, H, W = x.shape
    off = torch.arange(size)
    rows = torch.randint(H - size + 1, (B, per_image, 1), generator=generator) + off  # (B, P, size)
    cols = torch.randint(W - size + 1, (B, per_image, 1), generator=generator) + off
    b, ch = torch.arange(B)[:, None, None, None, None], torch.arange(C)[None, None, :, None, None]
    patches = x[b, ch, rows[:, :, None, :, None], cols[:, :, None, None, :]]  # (B, P, C, k, k)
    return patches.reshape(B * per_image, C * size * size)


def sliced_wasserstein(a, b, n_dirs=512, generator=None, chunk=128):
    """Sliced Wasserstein-1 of two equal-size point sets (N, D): the 1-D W1 of their projections on
    random unit directions (sort both, mean absolute difference), averaged over directions."""
    total = 0.0
    for start in range(0, n_dirs, chunk):
        d = torch.randn(a.shape[1], min(chunk, n_dirs - start), generator=generator, dtype=a.dtype)
        d = d / d.norm(dim=0, keepdim=True)
        pa, pb = (a @ d).t().contiguous(), (b @ d).t().contiguous()  # (dirs, N): rows sort faster
        total += (pa.sort(1).values - pb.sort(1).values).abs().mean(1).sum().item()
    return total / n_dirs


@torch.no_grad()
def pyramid_swd(x, ref, per_image=16, size=7, min_res=8, n_dirs=256, seed=0):
    """Scale-resolved sliced Wasserstein distance (ProGAN, Karras et al. 2018): per Laplacian level,
    7x7 patches of x against as many from ref, in units of 1e-3. Both sets are standardised with
    ref's per-channel statistics (ProGAN uses each set's own, which hides a wrong amplitude). ProGAN
    drew 128 patches per image and 512 directions; 16 and 256 keep a row to seconds on a CPU.
    Returns {res: swd}, finest level first."""
    n = min(len(x), len(ref))
    g = torch.Generator().manual_seed(seed)
    out, C = {}, x.shape[1]
    pyr_x, pyr_ref = (laplacian_pyramid(z[:n].float().cpu(), min_res) for z in (x, ref))
    for (res, bx), (_, br) in zip(pyr_x, pyr_ref):
        k = min(size, res)
        da, db = patch_descriptors(bx, per_image, k, g), patch_descriptors(br, per_image, k, g)
        mean = db.reshape(len(db), C, -1).mean((0, 2)).repeat_interleave(k * k)
        std = db.reshape(len(db), C, -1).std((0, 2)).repeat_interleave(k * k)
        out[res] = 1e3 * sliced_wasserstein((da - mean) / std, (db - mean) / std, n_dirs, g)
    return out


def spectral_distance(x, ref):
    """RMS over rings of 10 log10(RAPSD(x) / RAPSD(ref)) in dB: 0 for equal spectra, 3 dB for power
    off by a factor of 2 everywhere."""
    ratio = rapsd(x.cpu())[1] / rapsd(ref.cpu())[1]
    return (10 * ratio.log10()).pow(2).mean().sqrt().item()


FID_HOW = ("`pip install torch-fidelity` (or clean-fid) with its Inception weights available "
           "(downloaded on first use) to add it, or pass --fid false")


def compute_fid(x, ref, device, tmp_dir):
    """FID of x against ref via torch-fidelity (else clean-fid), from PNG folders, the standard way.

    Returns (fid or None, notice or None): never home-made; without a library (or its weights) the
    notice says how to enable it. Grey images are repeated to 3 channels by the libraries.
    """
    try:
        import torch_fidelity as backend
    except ImportError:
        try:
            from cleanfid import fid as backend
        except ImportError:
            return None, f"FID not computed: no torch-fidelity or clean-fid; {FID_HOW}"
    from torchvision.utils import save_image
    dirs = [os.path.join(tmp_dir, f"fid_{name}") for name in ("samples", "reference")]
    for d, imgs in zip(dirs, (x, ref)):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for j, img in enumerate(imgs.float().cpu()):
            save_image((img.clamp(-1, 1) + 1) / 2, os.path.join(d, f"{j:06d}.png"))
    try:
        if hasattr(backend, "calculate_metrics"):  # torch-fidelity
            value = backend.calculate_metrics(input1=dirs[0], input2=dirs[1], fid=True,
                                              verbose=False, cuda=device.type == "cuda")
            value = value["frechet_inception_distance"]
        else:
            value = backend.compute_fid(*dirs, mode="clean", device=device, verbose=False)
    except Exception as e:  # most often: the Inception weights cannot be downloaded (offline)
        return None, f"FID not computed: {type(e).__name__}: {str(e)[:120]}; {FID_HOW}"
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return float(value), None


def image_metrics(x, ref, c, device, toy=None):
    """Every sample-quality number of one set x against the reference images ref (both on CPU)."""
    m = dict(toy.evaluate(x)) if toy is not None else {}  # exact: fd, nll, mode_kl, modes_hit
    swd = pyramid_swd(x, ref, seed=c.seed)
    m.update(swd={str(r): v for r, v in swd.items()}, swd_mean=sum(swd.values()) / len(swd),
             spectral_db=spectral_distance(x, ref))
    if c.fid:
        value, notice = compute_fid(x, ref, device, c.out_dir)
        m.update(fid=value) if value is not None else m.update(fid_notice=notice)
    return m


# ------------------------------------------------------------------------------------------
#                                   --stage eval and bench
# ------------------------------------------------------------------------------------------


def synchronizer(device):
    """A function that waits for the device's queued work: timings must not stop before the GPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, repeats, device):
    """Wall seconds of each of `repeats` calls of fn, after one warm-up (CUDA synchronised)."""
    sync = synchronizer(device)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def spread(times, per=1):
    """Median, min and max of a list of timings, each divided by per."""
    t = sorted(v / per for v in times)
    return dict(median=t[len(t) // 2], min=t[0], max=t[-1])


def student_label(student_c, variant=""):
    """Table name of a student: method, what was off, its steps, and its run folder (variant)."""
    name = "DMD2 full-res" if student_c.full_res else "SwD"
    if student_c.mmd_weight == 0:
        name += " w/o patch loss"
    return f"{name}, {len(student_c.scales)} steps" + (f" [{variant}]" if variant else "")


def find_students(out_dir):
    """[(variant, path)] of student.pt in out_dir (variant "") and in its sub-folders."""
    found = [("", os.path.join(out_dir, "student.pt"))] + [
        (d, os.path.join(out_dir, d, "student.pt")) for d in sorted(os.listdir(out_dir))]
    return [(v, p) for v, p in found if os.path.exists(p)]


def eval_samplers(c, device):
    """[(name, nfe, sampler(y, generator))]: teacher Euler at --sample_steps and 4 steps (with a
    teacher or --teacher toy), then every student in out_dir. NFE: network calls per image (two
    per step under CFG), whatever their resolution. Returns (rows, the teacher network or None)."""
    rows, model = [], None
    if c.teacher == "toy" or os.path.exists(c.teacher or os.path.join(c.out_dir, "teacher.pt")):
        model = load_real_score(c, device)
        tag = "exact teacher" if c.teacher == "toy" else "teacher"
        for steps in sorted({c.sample_steps, 4}, reverse=True):
            rows.append((f"{tag} Euler, {steps} steps", steps * (1 if c.cfg == 1 else 2),
                         lambda y, g, n=steps: teacher_sampler(model, c, device, n, y, g)))
    for variant, path in find_students(c.out_dir):
        gen, student_c = model_from_checkpoint(load_checkpoint(path, "student"), "gen_ema", device)
        rows.append((student_label(student_c, variant), len(student_c.scales),
                     lambda y, g, gen=gen, sc=student_c: student_sampler(gen, sc, device, y, g)))
    return rows, model


def run_eval(c, device):
    """--stage eval: every sampler against the data; the first row is the floor (a second draw of
    data). Writes table.md and metrics.json, whose keys are:
    - `metrics.json`: `config`, `n`, `n_ref`, `reference`, `samplers`, `denoising`, `fid_note`
      (what FID is, or why there is none)
    - `metrics.json samplers` (one per row): `name`, `nfe`, `swd` (per level, keyed by resolution),
      `swd_mean`, `spectral_db`, `fid` or `fid_notice`, `ms_per_image` (not on the floor row); on
      the toy world also `fd`, `nll`, `mode_kl`, `modes_hit`
    """
    data = Data(c, device)
    toy, n, n_ref = data.toy, c.eval_n, c.eval_ref or c.eval_n  # toy: the exact world, or None
    ref = data.batch(n_ref, torch.Generator().manual_seed(c.seed + 1))[0].cpu()
    floor = data.batch(n, torch.Generator().manual_seed(c.seed + 2))[0].cpu()
    res = dict(config=dataclasses.asdict(c), n=n, n_ref=n_ref, reference=f"{n_ref} {c.data} images",
               denoising=[], samplers=[dict(name="data (floor)", nfe=0,
                                            **image_metrics(floor, ref, c, device, toy))])
    res["fid_note"] = res["samplers"][0].get("fid_notice") or (
        "FID off (--fid false)" if not c.fid else f"FID of {n} samples against {n_ref} {c.data} "
        "images" + (": trend-only (the standard is 50k)" if n < 10000 else ""))
    print(res["fid_note"])
    rows, model = eval_samplers(c, device)
    if toy is not None and model is not None and c.teacher != "toy":
        for r in c.scales:
            for s in (0.2, 0.5, 0.8, 0.95):
                mse, bayes = denoising_error(model, toy, r, s, min(n, 256), device, c.seed,
                                             c.precision)
                res["denoising"].append(dict(res=r, s=s, teacher_mse=mse, exact_mse=bayes,
                                             ratio=mse / bayes))
                print(f"teacher x0-MSE / exact at {r} px, s {s:.2f}: {mse / bayes:.3f}")
    B, y = min(c.eval_batch, n), grid_labels(n, c.num_classes, device)
    for name, nfe, sampler in rows:
        sampler(y[:8], torch.Generator().manual_seed(c.seed + 3))  # warm-up
        synchronizer(device)()
        g, t0 = torch.Generator().manual_seed(c.seed), time.perf_counter()
        x = torch.cat([sampler(y[j:j + B], g).float().cpu() for j in range(0, n, B)])
        sec = (time.perf_counter() - t0) / n  # the time of the calls that made the samples
        res["samplers"].append(dict(name=name, nfe=nfe, ms_per_image=1000 * sec,
                                    **image_metrics(x, ref, c, device, toy)))
    write_outputs(c.out_dir, {"metrics.json": res, "table.md": results_table(res)})
    if plot_learning_curves(c.out_dir, os.path.join(c.out_dir, "learning_curves.png")):
        print(f"wrote {os.path.join(c.out_dir, 'learning_curves.png')} (--eval_every rows)")
    return res


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


def results_table(results):
    """Markdown table of the sampler rows of run_eval (exact toy columns where they exist)."""
    rows = results["samplers"]
    toy, has_fid, levels = "fd" in rows[0], any("fid" in r for r in rows), list(rows[0]["swd"])
    head = ["sampler", "NFE"] + (["FD", "mode KL", "modes hit"] if toy else [])
    head += [f"SWD {r} px" for r in levels] + ["spectral dB"] + (["FID"] if has_fid else [])
    head += ["ms / image"]
    lines = [f"n = {results['n']} samples, reference {results['reference']}; SWD in units of 1e-3. "
             f"{results['fid_note']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], str(r["nfe"])]
        if toy:
            cells += [f"{r['fd']:.1f}", f"{r['mode_kl']:.3f}", str(r["modes_hit"])]
        cells += [f"{r['swd'][k]:.1f}" for k in levels] + [f"{r['spectral_db']:.2f}"]
        cells += [f"{r['fid']:.2f}" if "fid" in r else "-"] if has_fid else []
        cells += [f"{r['ms_per_image']:.3f}" if "ms_per_image" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class ShapeData:
    """Random images and labels with the data's shapes: what costs are timed on (no dataset)."""

    def __init__(self, c, device):
        self.c, self.device = c, device

    def batch(self, n, generator=None):
        x = torch.randn(n, self.c.channels, self.c.res, self.c.res, generator=generator)
        y = torch.randint(self.c.num_classes, (n,), generator=generator)
        return x.to(self.device), y.to(self.device)


def dit_macs(c, r):
    """Multiply-adds per image of one DiT call at resolution r: per block and token, qkv + output
    projection (4 d^2) and MLP (2 mlp_ratio d^2), plus attention's two T x T x d products (2 T d).
    Patchify, adaLN and the head are left out (small)."""
    T, d = (r // c.patch) ** 2, c.hidden
    return c.depth * T * ((4 + 2 * c.mlp_ratio) * d * d + 2 * T * d)


def run_bench(c, device):
    """--stage bench: sampling and training costs side by side on this device, with fresh networks
    of the preset's size on random images (cost does not depend on weights or pixels). Every
    number: median of --bench_repeats runs after a warm-up, with min and max. bench.json keys:
    - `bench.json`: `device`, `device_name`, `torch`, `preset`, `model`, `sampling`, `training`,
      `teacher`, `teacher_compiled` (the same keys as `teacher`; null without --compile true)
    - `bench.json sampling`: `batch`, `scale_wise_s`, `full_res_s`, `one_full_res_call_s` (each
      `median`, `min`, `max` seconds), `measured_ratio`, `analytic_ratio_tokens`,
      `analytic_ratio_flops`, `error_vs_analytic`, `scale_wise_in_full_res_calls`
    - `bench.json training`: `batch`, `fake_updates`, `swd_iter_s`, `dmd2_iter_s`, `ratio`,
      `preset_hours` (the preset's distill steps at `swd_iter_s`, on this device)
    - `bench.json teacher`: `batch`, `step_s`, `img_per_s`, `preset_hours` (the preset's steps),
      `flops_per_s` (achieved: forward + backward, 6 x MACs per image), `peak_flops_per_s` and
      `mfu` (CUDA with a known bf16 dense peak, else null)
    The eager numbers are written before the compiled teacher is timed (compiling can be slow).
    """
    torch.manual_seed(c.seed)
    K, R, n, reps = len(c.scales), c.res, c.bench_n, c.bench_repeats
    out = dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
               preset=c.preset, model=dict(res=R, channels=c.channels, patch=c.patch,
                                           hidden=c.hidden, depth=c.depth, scales=c.scales))
    # 1. sampling: scale-wise K steps vs full-resolution K steps vs one full-resolution call
    net = DiT.from_config(c).to(device).eval().requires_grad_(False)
    y, x = grid_labels(n, c.num_classes, device), torch.randn(n, c.channels, R, R).to(device)
    t_sw = spread(timed(lambda: student_sampler(net, c, device, y, full_res=False), reps, device))
    t_full = spread(timed(lambda: student_sampler(net, c, device, y, full_res=True), reps, device))
    with torch.no_grad(), autocast(device, c.precision):
        t_call = spread(timed(lambda: net(x, 0.5, y), reps, device))
    flops = sum(dit_macs(c, r) for r in c.scales) / (K * dit_macs(c, R))
    measured = t_sw["median"] / t_full["median"]
    out["sampling"] = dict(batch=n, scale_wise_s=t_sw, full_res_s=t_full,
                           one_full_res_call_s=t_call,
                           measured_ratio=measured, analytic_ratio_flops=flops,
                           analytic_ratio_tokens=sum(r * r for r in c.scales) / (K * R * R),
                           error_vs_analytic=measured / flops - 1,
                           scale_wise_in_full_res_calls=t_sw["median"] / t_call["median"])
    # 2. training: one SwD iteration vs one full-resolution DMD2 iteration (K scales, / K)
    data = ShapeData(c, device)
    real = DiT.from_config(c).to(device).eval().requires_grad_(False)
    out["training"] = dict(batch=c.distill_batch, fake_updates=c.fake_updates)
    for name, full in (("swd_iter_s", False), ("dmd2_iter_s", True)):
        run_c = dataclasses.replace(c, full_res=full)
        student = make_student(run_c, device, real)
        t = timed(lambda: [distill_iteration(student, real, data, run_c, i, device)
                           for i in range(K)], reps, device)
        out["training"][name] = spread(t, K)
    train = out["training"]
    train["ratio"] = train["swd_iter_s"]["median"] / train["dmd2_iter_s"]["median"]
    train["preset_hours"] = c.distill_steps * train["swd_iter_s"]["median"] / 3600
    out["teacher"], out["teacher_compiled"] = bench_teacher(c, device, data), None
    write_outputs(c.out_dir, {"bench.json": out})
    if c.compile:
        out["teacher_compiled"] = bench_teacher(c, device, data, compiled=True)
        write_outputs(c.out_dir, {"bench.json": out})
    print(bench_table(out))
    return out


# bf16 dense tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched in this order
BF16_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989),
                    ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125)]


def bench_teacher(c, device, data, compiled=False):
    """Teacher training throughput over one cycle of K steps (one scale each): step time, images
    and FLOP/s (forward + backward = 6 x MACs), MFU against the GPU's bf16 peak. compiled: the
    same steps through torch.compile (the warm-up cycle compiles every scale)."""
    K, teacher_c = len(c.scales), dataclasses.replace(c, teacher_target="sample", compile=False)
    model = DiT.from_config(teacher_c).to(device)
    ema, opt = copy.deepcopy(model).requires_grad_(False), torch.optim.AdamW(model.parameters())
    fwd = torch.compile(model) if compiled else model
    step = spread(timed(lambda: [teacher_iteration(j, fwd, model, ema, opt, data, teacher_c,
                                                   device) for j in range(K)],
                        c.bench_repeats, device), K)
    flops = 6 * c.batch * sum(dit_macs(c, r) for r in c.scales) / K / step["median"]
    name = device_name(device)
    peak = next((p * 1e12 for key, p in BF16_PEAK_TFLOPS if key in name), None) \
        if device.type == "cuda" else None
    if device.type == "cuda" and peak is None and not compiled:
        print(f"MFU: no bf16 peak known for {name}; add it to BF16_PEAK_TFLOPS")
    return dict(batch=c.batch, step_s=step, img_per_s=c.batch / step["median"],
                preset_hours=c.teacher_steps * step["median"] / 3600, flops_per_s=flops,
                peak_flops_per_s=peak, mfu=flops / peak if peak else None)


def device_name(device):
    """What the numbers were measured on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} threads "
            f"({platform.processor() or platform.system()})")


def bench_table(b):
    """Markdown summary of bench.json."""
    s, t, K = b["sampling"], b["training"], len(b["model"]["scales"])

    def ms(d):
        return f"{1000 * d['median']:.1f} ms ({1000 * d['min']:.1f}-{1000 * d['max']:.1f})"

    rows = [
        f"bench on {b['device_name']}, torch {b['torch']}, preset {b['preset']}", "",
        "| measurement | median (min-max) | ratio | analytic / goal |", "|---|---|---|---|",
        f"| sampling, scale-wise {K} steps, batch {s['batch']} | {ms(s['scale_wise_s'])} | "
        f"{s['measured_ratio']:.3f} of full-res | {s['analytic_ratio_flops']:.3f} (MACs), "
        f"{s['analytic_ratio_tokens']:.3f} (tokens) |",
        f"| sampling, full-res {K} steps | {ms(s['full_res_s'])} | 1 | |",
        f"| sampling, one full-res call | {ms(s['one_full_res_call_s'])} | scale-wise = "
        f"{s['scale_wise_in_full_res_calls']:.2f} calls | |",
        f"| training, one SwD iteration, batch {t['batch']} | {ms(t['swd_iter_s'])} | "
        f"{t['ratio']:.3f} of DMD2 | <= 0.6 |",
        f"| training, one full-res DMD2 iteration | {ms(t['dmd2_iter_s'])} | 1 | |"]
    for label, te in (("teacher step", b["teacher"]), ("teacher step, compiled",
                                                       b["teacher_compiled"])):
        if te:
            mfu = f"MFU {te['mfu']:.3f}" if te["mfu"] else "MFU: no known peak"
            rows.append(f"| {label}, batch {te['batch']} | {ms(te['step_s'])} | "
                        f"{te['img_per_s']:.0f} img/s, {te['flops_per_s'] / 1e12:.3f} TFLOP/s | "
                        f"{mfu} |")
    fastest = min((te for te in (b["teacher"], b["teacher_compiled"]) if te),
                  key=lambda te: te["preset_hours"])
    rows += ["", f"the preset's schedule on this device: teacher {fastest['preset_hours']:.1f} h, "
                 f"distillation {t['preset_hours']:.1f} h"]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------
#                             --stage report: the paper's claims
# ------------------------------------------------------------------------------------------


DMD2_SETTINGS = dict(full_res=True, sigmas=[1.0, 0.75, 0.5, 0.25], dmd_s=[0.02, 0.98])  # DMD2's run
VARIANTS = {  # the report's distillation runs, each in out_dir/<name>, over --seeds seeds
    "swd": dict(),
    "dmd2_full_res": dict(DMD2_SETTINGS),  # the fair baseline: DMD2's levels and range, GAN on
    "swd_no_patch": dict(mmd_weight=0.0),
}


def variant_folder(name, k):
    """Run folder of variant `name` at seed index k: the name, then _seed<k> for the extra seeds."""
    return name if k == 0 else f"{name}_seed{k}"


def train_variants(c, device, names, seeds=1):
    """The teacher (if missing) and the named VARIANTS at `seeds` seeds (each run if missing).
    Returns {phase: wall seconds}, None for what was already there and reused."""
    teacher = c.teacher or os.path.join(c.out_dir, "teacher.pt")
    t0, times = time.time(), {"teacher": None}
    if c.teacher == "toy":
        init_network_for_toy(c, device)
        times["teacher"] = time.time() - t0
    elif not os.path.exists(teacher):
        train_teacher(c, device)
        times["teacher"] = time.time() - t0
    for k in range(seeds):
        for name in names:
            folder = variant_folder(name, k)
            run_c = dataclasses.replace(c, out_dir=os.path.join(c.out_dir, folder),
                                        teacher=c.teacher or teacher, seed=c.seed + k,
                                        **VARIANTS[name])
            os.makedirs(run_c.out_dir, exist_ok=True)
            times[folder] = None
            if os.path.exists(os.path.join(run_c.out_dir, "student.pt")):
                print(f"{folder}: using the existing {run_c.out_dir}/student.pt")
                continue
            init = os.path.join(run_c.out_dir, "toy_init.pt")
            if c.teacher == "toy" and not os.path.exists(init):
                shutil.copy(os.path.join(c.out_dir, "toy_init.pt"), init)
            t0 = time.time()
            distill(run_c, device)
            times[folder] = time.time() - t0
    return times


def seed_stats(rows, key, variant):
    """Mean, min, max and count of rows[key] over a variant's seeds (rows "... [variant_seedK]")."""
    vals = [r[key] for r in rows if re.search(rf"\[{variant}(_seed\d+)?\]$", r["name"])]
    if not vals:
        return dict(mean=float("nan"), min=float("nan"), max=float("nan"), n=0)
    return dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals), n=len(vals))


def fmt_stats(stats):
    """'mean' or 'mean (min-max)' when there are several seeds."""
    spread_ = f" ({stats['min']:.1f}-{stats['max']:.1f})" if stats["n"] > 1 else ""
    return f"{stats['mean']:.1f}" + spread_


def judge_claims(c, metrics, spectra, bench):
    """The paper's five claims as (id, claim, criterion, numbers, reproduced). Quality: the toy
    world's exact FD, or on datasets the mean pyramid SWD; lower is better either way."""
    rows, K = metrics["samplers"], len(c.scales)
    key = "fd" if "fd" in rows[0] else "swd_mean"
    unit = "FD" if key == "fd" else "SWD"
    stats = {v: seed_stats(rows, key, v) for v in VARIANTS}
    swd_, dmd2, no_patch = (stats[v]["mean"] for v in VARIANTS)
    e4, eN = (next((r[key] for r in rows if r["name"].endswith(f"teacher Euler, {n} steps")),
                   float("nan")) for n in (4, c.sample_steps))
    seeds = f"mean of {stats['swd']['n']} seed{'s' if stats['swd']['n'] > 1 else ''}"
    ks = [(d["s"], d["crossover"]) for d in spectra["levels"]]
    curve, lowest = spectra["crossover_curve"]["k"], spectra["data"]["freqs"][0]
    falls = all(b <= a for a, b in zip(curve, curve[1:])) and all(
        b < a or a <= lowest for (_, a), (_, b) in zip(ks, ks[1:]))
    order, ratio = spectra["order"], bench["sampling"]["measured_ratio"]
    names = ("true x_t", "(a) up, then noise", "(b) noise, then up")
    mse = [order[k].get("denoise_mse", float("nan")) for k in names]
    return [
        ("C1", "the crossover k*(s) falls as s rises", f"never rising over {len(curve)} levels, "
         f"strictly falling at the listed ones until the lowest ring ({lowest:.3f} cycles / px)",
         ", ".join(f"k*({s}) = {k:.3f}" for s, k in ks), falls),
        ("C2", "upsample-then-renoise is far better than renoise-then-upsample",
         "teacher x0-MSE: (a) within 10% of the true x_t's, (b) at least 1.25x (a)'s",
         f"x0-MSE at s = {order['s']}, {order['res_from']} -> {order['res_to']} px: true "
         f"{mse[0]:.4f}, (a) {mse[1]:.4f}, (b) {mse[2]:.4f}; spectral distance to the true x_t (a) "
         f"{order[names[1]]['spectral_db']:.2f} dB, (b) {order[names[2]]['spectral_db']:.2f} dB",
         mse[1] <= 1.1 * mse[0] and mse[2] >= 1.25 * mse[1]),
        ("C3", f"SwD {K}-step matches full-res DMD2 {K}-step at <= 0.55x the sampling cost",
         f"{unit} ({seeds}) at most 1.1x DMD2's; measured sampling time ratio <= 0.55",
         f"{unit}: SwD {fmt_stats(stats['swd'])}, DMD2 {fmt_stats(stats['dmd2_full_res'])} (floor "
         f"{rows[0][key]:.1f}); time ratio {ratio:.3f} (analytic "
         f"{bench['sampling']['analytic_ratio_flops']:.3f})", swd_ <= 1.1 * dmd2 and ratio <= 0.55),
        ("C4", "the patch loss helps", f"{unit} with < without ({seeds})",
         f"{unit}: with {fmt_stats(stats['swd'])}, without {fmt_stats(stats['swd_no_patch'])}",
         swd_ < no_patch),
        ("C5", f"SwD {K}-step far better than teacher 4-step Euler, close to {c.sample_steps}-step",
         f"{unit} ({seeds}) at most 0.75x Euler-4's and at most 1.25x Euler-{c.sample_steps}'s",
         f"{unit}: SwD {fmt_stats(stats['swd'])}, Euler 4 {e4:.1f}, "
         f"Euler {c.sample_steps} {eN:.1f}",
         swd_ <= 0.75 * e4 and swd_ <= 1.25 * eN)]


def seed_table(c, metrics):
    """The main rows over seeds: quality mean (min-max) and time per image; teacher rows as is."""
    rows = metrics["samplers"]
    key = "fd" if "fd" in rows[0] else "swd_mean"
    lines = [f"| sampler | {'exact FD' if key == 'fd' else 'mean SWD'}: mean (min-max) | seeds | "
             "ms / image |", "|---|---|---|---|", f"| data (floor) | {rows[0][key]:.1f} | | |"]
    lines += [f"| {r['name']} | {r[key]:.1f} | | {r['ms_per_image']:.3f} |" for r in rows
              if "teacher Euler" in r["name"]]
    for v in VARIANTS:
        stats = seed_stats(rows, key, v)
        ms = next((r["ms_per_image"] for r in rows if r["name"].endswith(f"[{v}]")), float("nan"))
        lines.append(f"| {v} | {fmt_stats(stats)} | {stats['n']} | {ms:.3f} |")
    return "\n".join(lines)


def collapse_table(c, levels=(0.02, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)):
    """Markdown: within-class mode entropy of the exact posterior (ToyTeacher.mode_entropy) at the
    first scale and at full resolution, with the DMD re-noising ranges of SwD and DMD2."""
    from toy_teacher import ToyTeacher
    toy = ToyTeacher(res=c.res, num_classes=c.num_classes, channels=c.channels)
    lines = ["Within-class mode entropy of the exact posterior (bits; 1 = the two components of a "
             f"class still undecided). DMD re-noises SwD at s in {c.dmd_s}, DMD2 at s in "
             f"{DMD2_SETTINGS['dmd_s']}.", "",
             "| resolution | " + " | ".join(f"s = {s}" for s in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for r in sorted({c.scales[0], c.res}):
        h = toy.mode_entropy(r, levels, seed=c.seed)
        lines.append(f"| {r} px | " + " | ".join(f"{v:.2f}" for v in h) + " |")
    return "\n".join(lines)


def report_markdown(c, claims, times, total, bench, metrics, extra=()):
    """The claims table with the command, machine and time that produced it, then extra blocks."""
    ran = ", ".join(f"{k} reused" if v is None else f"{k} {v:.0f} s" if v < 90 else
                    f"{k} {v / 60:.1f} min" for k, v in times.items())
    lines = [f"<!-- report:{c.preset} -->", f"**Preset `{c.preset}`**: `python swd_mini.py --stage "
             f"report --preset {c.preset}{config_flags(c)}` on {bench['device_name']}, torch "
             f"{bench['torch']}: {total / 60:.1f} min in all ({ran}). Samples per row: "
             f"{metrics['n']}, reference {metrics['reference']}.", "",
             "| claim | criterion | measured | reproduced |", "|---|---|---|---|"]
    for cid, claim, crit, numbers, ok in claims:
        lines.append(f"| **{cid}** {claim} | {crit} | {numbers} | {'yes' if ok else '**no**'} |")
    for block in extra:
        lines += ["", block]
    return "\n".join(lines + [f"<!-- /report:{c.preset} -->"])


def config_flags(c):
    """The flags that set c apart from its preset (what to type to get the same run)."""
    base = dataclasses.replace(preset_config(c.preset), out_dir=os.path.join("runs", c.preset))
    flags = ""
    for f in dataclasses.fields(Config):
        v = getattr(c, f.name)
        if f.name not in ("stage", "preset", "readme") and v != getattr(base, f.name):
            flags += f" --{f.name} " + (",".join(map(str, v)) if isinstance(v, list) else
                                        str(v).lower() if isinstance(v, bool) else str(v))
    return flags


def splice_report(path, block, preset):
    """Replace this preset's block in the README (between its report markers), or append it."""
    text = open(path).read() if os.path.exists(path) else ""
    start, end = f"<!-- report:{preset} -->", f"<!-- /report:{preset} -->"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def run_report(c, device):
    """--stage report: what the five claims need, run if missing (teacher; SwD, full-res DMD2 and
    SwD w/o patch loss at --seeds seeds), then eval, spectra and bench; the claims table goes into
    the README (--readme), and with the per-seed and collapse tables to out_dir/report.md."""
    t0 = time.time()
    times, results = train_variants(c, device, list(VARIANTS), c.seeds), {}
    for name, fn in (("eval", run_eval), ("spectra", run_spectra), ("bench", run_bench)):
        t = time.time()
        results[name] = fn(c, device)
        times[name] = time.time() - t
    claims = judge_claims(c, results["eval"], results["spectra"], results["bench"])
    extra = [seed_table(c, results["eval"])]
    if os.path.exists(os.path.join(c.out_dir, "learning_curves.png")):  # drawn by run_eval
        extra.append(f"Learning curves (--eval_every {c.eval_every}): "
                     f"{c.out_dir}/learning_curves.png")
    if c.data == "toy":
        extra.append(collapse_table(c))
    args = (c, claims, times, time.time() - t0, results["bench"], results["eval"])
    write_outputs(c.out_dir, {"report.md": report_markdown(*args, extra)})
    if c.readme:  # the README gets the claims; report.md holds the other tables too
        readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), c.readme)
        splice_report(readme, report_markdown(*args, [f"All tables: `{c.out_dir}/report.md`."]),
                      c.preset)
        print(f"wrote the {c.preset} block of {readme}")
    return claims


# ------------------------------------------------------------------------------------------
#           --stage diagnose: what limits distillation, measured against the truth
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def dmd_gradient_at_data(net, toy, c, levels, n=256, residual=False, seed=0):
    """RMS of the normalised DMD gradient g = (mu_fake - mu_real) / mean|x0 - mu_real| on *real*
    images, with `net` standing in for a fake score that has learned the data and the exact
    denoiser as the real score. The ideal g there is 0: what is measured is the fake network's
    error, which DMD turns into a push away from the data. residual=True: the residual fake score
    (real + net's correction). Returns [RMS g for s in levels]."""
    g = torch.Generator().manual_seed(seed)
    x0, y = toy.sample(n, generator=g)
    out = []
    for s in levels:
        x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
        mu_real = toy.denoise(x_t.double(), s, y).float()
        if residual:  # the correction plus the exact real score
            v = net(x_t, s, y, skip=False) + toy.velocity(x_t.double(), s, y).float()
        else:
            v = net(x_t, s, y)
        gd = (to_x0(x_t, s, v) - mu_real) / (x0 - mu_real).abs().mean((1, 2, 3), keepdim=True)
        out.append(float(gd.pow(2).mean().sqrt()))
    return out


def run_diagnose(c, device, levels=(0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.79, 0.9, 0.98)):
    """--stage diagnose (toy world). Writes diagnose.json and prints:
    1. the exact posterior mean as a few-step sampler (no network at all) on three schedules;
    2. the within-class mode entropy of the exact posterior (collapse_table);
    3. the RMS DMD gradient on real images with the teacher (with --teacher toy: the cached
       exact-regressed init) as the fake score: the error a fake network of this size pushes."""
    if c.data != "toy":
        raise UserError("--stage diagnose needs the exact toy world: --data toy")
    from toy_teacher import ToyTeacher
    toy, n = ToyTeacher(res=c.res, num_classes=c.num_classes, channels=c.channels), c.eval_n
    y, out = grid_labels(n, c.num_classes, "cpu"), dict(n=n, levels=list(levels), posterior_mean=[])
    print(f"1. exact posterior mean as a 4-step sampler, FD (n = {n}; floor "
          f"{toy.noise_floor(n)['fd']:.1f})")
    for name, scales, sigmas in (("SwD, --sigmas", c.scales, c.sigmas),
                                 ("SwD, SD3.5 levels", c.scales, [1.0, 0.9, 0.75, 0.6]),
                                 ("full-res, DMD2 levels", [c.res] * 4, DMD2_SETTINGS["sigmas"])):
        g = torch.Generator().manual_seed(c.seed)
        noise = torch.randn(n, c.channels, scales[0], scales[0], generator=g)
        x = scale_wise_sample(lambda z, s: toy.denoise(z.double(), s, y).float(), noise, scales,
                              sigmas, g)
        m = toy.evaluate(x)
        out["posterior_mean"].append(dict(name=name, sigmas=list(sigmas), fd=m["fd"],
                                          mode_kl=m["mode_kl"]))
        print(f"   {name:22s} {sigmas}: FD {m['fd']:.1f}, mode KL {m['mode_kl']:.3f}")
    print("2. " + collapse_table(c))
    net = init_network_for_toy(c, device) if c.teacher == "toy" else load_real_score(c, device)
    rms = dmd_gradient_at_data(net.cpu(), toy, c, levels, seed=c.seed)
    out["rms_dmd_gradient_at_data"] = rms
    print("3. RMS DMD gradient at the data, fake score = " + ("exact-regressed init" if c.teacher ==
          "toy" else "teacher") + ": " + ", ".join(f"s {s}: {g:.2f}" for s, g in zip(levels, rms)))
    write_outputs(c.out_dir, {"diagnose.json": out})
    return out


def learning_curves(out_dir):
    """{run: [eval rows]} from the log.jsonl of out_dir and its sub-folders (--eval_every rows);
    run is "<folder or .>: teacher|student"."""
    curves = {}
    for folder in ["."] + sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, folder, "log.jsonl")
        for line in open(path) if os.path.isfile(path) else []:
            row = json.loads(line)
            if row.get("stage") == "eval":
                curves.setdefault(f"{folder}: {row['of']}", []).append(row)
    return curves


def plot_learning_curves(out_dir, path):
    """Exact FD against step and against training seconds, one line per run; the floor dotted."""
    curves = learning_curves(out_dir)
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (run, rows) in enumerate(curves.items()):
        for ax, x in zip(axes, ("step", "seconds")):
            ax.plot([r[x] for r in rows], [r["fd"] for r in rows], ".-", color=f"C{i % 10}",
                    label=run)
            ax.axhline(rows[0]["floor"], color="k", ls=":", lw=0.8)
    axes[0].set(xlabel="step", ylabel=f"exact FD (n = {rows[0]['n']}; dotted: floor)",
                title="FD against step")
    axes[1].set(xlabel="training seconds (this machine)", title="FD against CPU time")
    axes[1].legend(fontsize=7)
    save_figure(fig, path)
    return path


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


# ------------------------------------------------------------------------------------------
#                     --stage spectra: the spectral argument as figures
# ------------------------------------------------------------------------------------------


def power_law_fit(freqs, power):
    """Least-squares line log P = slope log k + intercept: (slope, intercept); ~ -2 for photos."""
    A = torch.stack([freqs.log(), torch.ones_like(freqs)], 1)
    slope, intercept = torch.linalg.lstsq(A, power.log()[:, None]).solution[:, 0].tolist()
    return slope, intercept


def power_law_slope(freqs, power):
    """The slope of power_law_fit: the spectrum's exponent."""
    return power_law_fit(freqs, power)[0]


def auto_schedule(freqs, power, scales, margin=4.0):
    """Noise levels for a scale-wise schedule from the data's RAPSD at full resolution (ours).

    Step i runs at r_i on an input upsampled from r_{i-1}, which holds nothing above r_{i-1}'s
    Nyquist f = r_{i-1} / (2 R) (cycles per full-resolution pixel). That input is a faithful x_t at
    r_i only if everything above f is drowned: (1-s)^2 P_i(k) <= s^2 / margin for k > f, with
    P_i = P (r_i / R)^2 the spectrum after area down-sampling. Hence s_i = q / (1 + q), q =
    sqrt(margin max_{k>f} P_i(k)); s_1 = 1. Levels may not rise, so each s_i is raised to the
    largest level a later step needs. With P ~ k^-2 and doubling scales every step asks about the
    same level; steeper spectra give falling ones.
    """
    R = scales[-1]
    sig = [1.0]
    for prev, r in zip(scales, scales[1:]):
        q = (margin * power[freqs > prev / (2 * R)].max().item() * (r / R) ** 2) ** 0.5
        sig.append(q / (1 + q))
    for i in range(len(sig) - 2, 0, -1):  # never rising: s_i >= s_{i+1}
        sig[i] = max(sig[i], sig[i + 1])
    return sig


def resolve_schedule(c, device):
    """c with --schedule auto's levels in place of --sigmas (c itself for --schedule hand)."""
    if c.schedule != "auto":
        return c
    c = dataclasses.replace(c, sigmas=auto_schedule(*data_spectrum(c, device), c.scales,
                                                    c.schedule_margin))
    print(f"schedule auto (margin {c.schedule_margin}): {[round(v, 4) for v in c.sigmas]}")
    return c


def data_spectrum(c, device, n=512):
    """Full-resolution RAPSD (freqs, power) of n data images, fixed seed."""
    x, _ = Data(c, device).batch(n, torch.Generator().manual_seed(c.seed))
    return rapsd(x.cpu())


def spectra_denoiser(c, device):
    """The order experiment's denoiser: the trained teacher if there is one, else the exact one."""
    path = c.teacher if c.teacher not in ("", "toy") else os.path.join(c.out_dir, "teacher.pt")
    if c.teacher != "toy" and os.path.exists(path):
        return load_real_score(dataclasses.replace(c, teacher=path), device)
    if c.data == "toy":
        return load_real_score(dataclasses.replace(c, teacher="toy"), device)
    return None


def noise_figure(c, x0, f, P, levels, g):
    """Figure 1: the data's RAPSD and power law; x_t and s eps at several levels, with k*(s)."""
    plt, out = pyplot(), {"levels": []}
    slope, intercept = power_law_fit(f, P)
    out["data"] = dict(freqs=f.tolist(), power=P.tolist(), slope=slope)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(f, P, "k", lw=2, label=f"data (slope {slope:.2f})")
    ax.loglog(f, (slope * f.log() + intercept).exp(), "k:", lw=0.8, label="power-law fit")
    for s, col in zip(levels, plt.cm.viridis(np.linspace(0, 0.9, len(levels)))):
        eps = torch.randn(x0.shape, generator=g)
        ks, (fx, Px) = crossover(f, P, s), rapsd((1 - s) * x0 + s * eps)
        ax.loglog(fx, Px, color=col, label=f"x_t, s={s}")
        ax.loglog(f, rapsd(s * eps)[1], "--", color=col, lw=0.8)
        ax.axvline(ks, color=col, ls=":", lw=0.8)
        out["levels"].append(dict(s=s, crossover=ks, power_xt=Px.tolist()))
    ax.set(xlabel="frequency (cycles / pixel)", ylabel="power",
           title="1. x_t; dashed: s eps; dotted: k*(s)")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(c.out_dir, "spectra_1_noise.png"))
    return out


def schedule_figure(c, f, P):
    """Figure 2: k*(s) against s, with each schedule's (Nyquist of the previous scale, s_i)."""
    plt, grid = pyplot(), np.linspace(0.02, 0.99, 60)
    kstar = [crossover(f, P, float(s)) for s in grid]
    auto = auto_schedule(f, P, c.scales, c.schedule_margin)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.semilogy(grid, kstar, "k", label="k*(s): signal = noise (full res)")
    for name, sig, mk in (("--sigmas", c.sigmas, "o"), ("auto", auto, "s")):
        for i in range(1, len(c.scales)):  # step i starts from r_{i-1}: nothing above its Nyquist
            ax.semilogy(sig[i], c.scales[i - 1] / (2 * c.res), mk, color="C3" if name == "auto"
                        else "C0", label=f"{name} schedule" if i == 1 else None)
    ax.set(xlabel="noise level s", ylabel="frequency (cycles / full-res pixel)",
           title="2. k*(s) and schedules: points above the curve\n"
                 "have drowned what r_(i-1) cannot hold")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(c.out_dir, "spectra_2_schedule.png"))
    return dict(crossover_curve=dict(s=grid.tolist(), k=kstar),
                schedules=dict(scales=c.scales, hand=c.sigmas, auto=auto, margin=c.schedule_margin))


def order_figure(c, device, x0, y, g):
    """Figure 3, the order experiment (SwD table 1): r -> 2r by upsample-then-noise (a) against
    noise-then-upsample (b), compared with a true x_t by spectrum and by the denoiser's x0-MSE."""
    r, s = c.res // 2, 0.75  # one octave up, at a level where the noise has drowned that octave
    small = downsample(x0, r)
    eps_r, eps_R = torch.randn(small.shape, generator=g), torch.randn(x0.shape, generator=g)
    truth = (1 - s) * x0 + s * eps_R
    a = (1 - s) * upsample(small, c.res) + s * eps_R  # (a) upsample the clean image, then noise
    b = upsample((1 - s) * small + s * eps_r, c.res)  # (b) noise at r, then upsample the noisy one
    real, order = spectra_denoiser(c, device), dict(res_from=r, res_to=c.res, s=s)
    fig, ax = pyplot().subplots(figsize=(5, 4))
    for name, z, style in (("true x_t", truth, "k"), ("(a) up, then noise", a, "C0"),
                           ("(b) noise, then up", b, "C3")):
        fz, Pz = rapsd(z)
        ax.loglog(fz, Pz, style, label=name)
        order[name] = dict(power=Pz.tolist(), spectral_db=spectral_distance(z, truth))
        if real is not None:
            with torch.no_grad():
                pred = to_x0(z.to(device), s, real(z.to(device), s, y.to(device))).float().cpu()
            order[name]["denoise_mse"] = F.mse_loss(pred, x0).item()
    ax.set(xlabel="frequency (cycles / pixel)", ylabel="power",
           title=f"3. {r} -> {c.res} px, s = {s}")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(c.out_dir, "spectra_3_order.png"))
    return order


def student_figure(c, device, x0, y):
    """Figure 4: each step's RAPSD for the scale-wise student against the data at that scale."""
    checkpoints = (load_checkpoint(p, "student") for _, p in find_students(c.out_dir))
    scale_wise = next((ckpt for ckpt in checkpoints if not ckpt["config"]["full_res"]), None)
    if scale_wise is None:  # the scale-wise student in out_dir, else the first in a sub-folder
        return None
    gen, student_c = model_from_checkpoint(scale_wise, "gen_ema", device)
    g = torch.Generator().manual_seed(c.seed)
    _, traj = student_sampler(gen, student_c, device, y.to(device), g, return_trajectory=True)
    fig, axes = pyplot().subplots(1, len(traj), figsize=(3 * len(traj), 3))
    out = []
    for ax, t in zip(np.atleast_1d(axes), traj):
        (fs, Ps), (fd, Pd) = rapsd(t.float().cpu()), rapsd(downsample(x0, t.shape[-1]))
        ax.loglog(fd, Pd, "k", label="data")
        ax.loglog(fs, Ps, "C1", label="student")
        ax.set(title=f"{t.shape[-1]} px", xlabel="cycles / pixel")
        out.append(dict(res=t.shape[-1], power_student=Ps.tolist(), power_data=Pd.tolist()))
    np.atleast_1d(axes)[0].legend(fontsize=7)
    save_figure(fig, os.path.join(c.out_dir, "spectra_4_student.png"))
    return out


def run_spectra(c, device, levels=(0.2, 0.5, 0.8, 0.95)):
    """--stage spectra: the spectral argument as spectra_*.png, the numbers in spectra.json."""
    x0, y = Data(c, device).batch(min(c.eval_n, 512), torch.Generator().manual_seed(c.seed))
    x0, g = x0.cpu(), torch.Generator().manual_seed(c.seed + 1)
    f, P = rapsd(x0)
    out = noise_figure(c, x0, f, P, levels, g)
    out.update(schedule_figure(c, f, P), order=order_figure(c, device, x0, y, g))
    student = student_figure(c, device, x0, y)
    if student is not None:
        out["student"] = student
    with open(os.path.join(c.out_dir, "spectra.json"), "w") as fh:
        json.dump(out, fh)
    order = out["order"]
    print(f"data slope {out['data']['slope']:.2f}; crossover " +
          ", ".join(f"k*({d['s']})={d['crossover']:.3f}" for d in out["levels"]))
    print(f"schedule for {c.scales}: --sigmas {c.sigmas}, auto "
          f"{[round(v, 3) for v in out['schedules']['auto']]}")
    if "denoise_mse" in order["true x_t"]:
        print("order experiment, x0-MSE: " + ", ".join(
            f"{k} {order[k]['denoise_mse']:.4f}" for k in ("true x_t", "(a) up, then noise",
                                                          "(b) noise, then up")))
    print(f"wrote spectra_*.png and spectra.json in {c.out_dir}")
    return out


# ------------------------------------------------------------------------------------------
#            Plumbing: checkpoints (atomic, safe to load, resumable bit for bit)
# ------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = 2  # bumped when what a checkpoint holds changes


class TrainingStopped(Exception):
    """A run stopped on purpose (non-finite numbers): one line on stderr, exit code 3."""


def check_finite(step, **values):
    """The numerical guard: stop, before the optimiser step, at a non-finite loss or norm (scalars;
    one device sync for all of them)."""
    finite = torch.isfinite(torch.stack([v.detach().float() for v in values.values()])).tolist()
    for (name, v), ok in zip(values.items(), finite):
        if not ok:
            value = v.item()
            raise TrainingStopped(f"step {step}: {name} is {value}; nothing was saved from this "
                                  "step, the last checkpoint is intact; "
                                  "lower --lr / --distill_lr or raise --warmup, then --resume true")


def checkpoint_if_due(done, total, path, kind, c, nets, stop):
    """A checkpoint after `done` of `total` steps, every --ckpt_every and --sample_every steps and
    when a signal asked to stop (then exit); the last one is written by the loop itself."""
    due = any(n and done % n == 0 for n in (c.ckpt_every, c.sample_every))
    if any_rank(stop.signum):  # under torchrun the ranks agree to stop at the same step
        stop.signum = stop.signum or signal.SIGTERM
    if done < total and (due or stop.signum):
        save_checkpoint(path, kind, c, done, nets)
        stop.exit_if_asked(done, path)


def save_checkpoint(path, kind, c, step, nets):
    """Write kind, config, step, RNG state and every state_dict in nets (modules and optimisers)
    atomically: a temporary file in the same folder, flushed and fsynced, then os.replace. A crash
    mid-write leaves the previous checkpoint as it was. Under torchrun rank 0 alone writes."""
    if DIST.rank > 0:
        return
    state = dict(kind=kind, format=CHECKPOINT_FORMAT, config=dataclasses.asdict(c), step=step,
                 rng=torch.get_rng_state(), **{k: m.state_dict() for k, m in nets.items()})
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, kind):
    """A checkpoint of this script, loaded with weights_only=True (tensors and plain containers
    only), so that a file from elsewhere cannot run code. kind: 'teacher' or 'student'."""
    import pickle
    if not os.path.isfile(path):
        raise UserError(f"no {kind} checkpoint at {path}; train one or fix the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).split("\n")[0][:100] or "unsafe content"
        raise UserError(f"{path} refused: it holds more than tensors and plain data ({why}); "
                        "swd_mini never writes such files; do not load it") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated or "
                        "another format); delete it or retrain") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") not in ("teacher", "student"):
        raise UserError(f"{path} is not a checkpoint of swd_mini.py")
    if checkpoint["kind"] != kind:
        raise UserError(f"{path} is a {checkpoint['kind']} checkpoint, but a {kind} is needed here")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} was written by another version of swd_mini.py (format "
                        f"{checkpoint.get('format', 1)}, this is {CHECKPOINT_FORMAT}); retrain it")
    return checkpoint


def model_from_checkpoint(checkpoint, key, device):
    """The network checkpoint[key] ("ema", "gen_ema"), frozen, and the config it trained with."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    c = TrainConfig(**{k: v for k, v in checkpoint["config"].items() if k in known})
    model = DiT.from_config(c).to(device)
    model.load_state_dict(checkpoint[key])
    return model.eval().requires_grad_(False), c


def check_same_network(path, other, c):
    """Refuse a checkpoint whose network differs from the run's, saying which flag to pass."""
    for key in ("res", "channels", "num_classes", "patch", "hidden", "depth", "heads", "mlp_ratio"):
        if getattr(other, key) != getattr(c, key):
            raise UserError(f"{path} has {key}={getattr(other, key)}, this run {getattr(c, key)}; "
                            f"pass --{key} {getattr(other, key)} or retrain")


def resume_from(path, kind, c, nets):
    """--resume: load every state in nets and the RNG from path; returns the step to start at."""
    if not c.resume or not os.path.exists(path):
        if os.path.exists(path):
            print(f"note: {path} is replaced at the first checkpoint (--resume true continues it)")
        return 0
    checkpoint = load_checkpoint(path, kind)
    for key, m in nets.items():
        m.load_state_dict(checkpoint[key])
    torch.set_rng_state(checkpoint["rng"])
    print(f"resumed {kind} from {path} at step {checkpoint['step']}")
    return checkpoint["step"]


class StopOnSignal:
    """SIGINT / SIGTERM ask the training loop to save at the next step boundary and exit."""

    def __enter__(self):
        self.signum, self.old = None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self.ask)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    def ask(self, signum, frame):
        self.signum = signum

    def exit_if_asked(self, step, path):
        if self.signum:
            barrier()  # rank 0 has written the checkpoint
            print(f"\nstopped by signal {self.signum} after step {step}; {path} holds it; continue "
                  "with the same command and --resume true", file=sys.stderr)
            sys.exit(128 + self.signum)

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


def prepare_out_dir(path):
    """Create out_dir, or say in one line why it cannot be used."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out_dir {path} is a file; pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir {path} cannot be created ({e.strerror}); pass another") \
            from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {path} is not writable; pass another folder")


# ------------------------------------------------------------------------------------------
#               Plumbing: devices, precision, data-parallel training under torchrun
# ------------------------------------------------------------------------------------------
# torchrun --nproc_per_node=N swd_mini.py ... starts N copies of this script. Every rank draws the
# *global* batch, its noise and levels from the same seeded generator and keeps its own slice
# (local), then the ranks average their gradients (average_gradients) before each optimiser step.
# So N ranks compute what one process computes on the global batch, up to float rounding, and
# checkpoints, RNG states and logs do not depend on N.


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


@dataclass
class Ranks:
    rank: int = 0  # this process, 0..world-1; rank 0 alone writes files
    world: int = 1  # number of processes
    local_rank: int = 0  # this process on its node: its GPU


DIST = Ranks()


def setup_distributed(c, device):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1; the device."""
    global DIST
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device
    import torch.distributed as dist
    DIST = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", DIST.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    import atexit
    atexit.register(dist.destroy_process_group)
    for name in ("batch", "distill_batch"):
        if getattr(c, name) % world:
            raise UserError(f"--{name} {getattr(c, name)} is the global batch: it must be "
                            f"divisible by the {world} ranks")
    return device


def local(*tensors):
    """This rank's slice of global-batch tensors (dim 0); the tensors themselves on one process."""
    if DIST.world > 1:
        tensors = tuple(t.chunk(DIST.world)[DIST.rank] for t in tensors)
    return tensors if len(tensors) > 1 else tensors[0]


def global_noise(like, n):
    """Standard normal noise for a global batch of n images shaped like `like`: this rank's part."""
    return local(torch.randn((n, *like.shape[1:]), device=like.device, dtype=like.dtype))


def average_gradients(params, *losses):
    """What DistributedDataParallel does, written out: one all-reduce of every gradient and of the
    losses, divided by the number of ranks. (SwD calls the fake network through .features() and
    the GAN head twice per step, which DDP's forward hooks do not follow.) Returns the losses,
    averaged; on one process, as they are."""
    if DIST.world == 1:
        return losses
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [v.detach().reshape(1) for v in losses])
    dist.all_reduce(flat)
    flat /= DIST.world
    for g, part in zip(grads, flat.split([g.numel() for g in grads] + [1] * len(losses))):
        g.copy_(part.view_as(g))
    return tuple(flat[len(flat) - len(losses):].unbind()) if losses else ()


def any_rank(flag):
    """True on every rank when flag is true on any (a stop request must be agreed on)."""
    if DIST.world == 1:
        return bool(flag)
    import torch.distributed as dist
    t = torch.tensor([float(bool(flag))])
    t = t.cuda() if dist.get_backend() == "nccl" else t
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier():
    if DIST.world > 1:
        import torch.distributed as dist
        dist.barrier()


# ------------------------------------------------------------------------------------------
#                                  Plumbing: dataset files
# ------------------------------------------------------------------------------------------
# Every reader gives (uint8 images (N, C, H, W), int64 labels (N,)).
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
        try:
            import torchvision
            ds = torchvision.datasets.FashionMNIST(folder, train=True, download=True)
        except Exception as e:  # offline, or a read-only folder
            raise UserError(f"Fashion-MNIST not found in {folder} and could not be downloaded "
                            f"({type(e).__name__}); `apt-get install dataset-fashion-mnist` "
                            "or pass --data_dir") from None
        x, y = ds.data.numpy(), ds.targets.numpy()
    if len(x) != len(y):
        raise UserError(f"{folder}: {len(x)} images but {len(y)} labels")
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]  # (N, 1, 32, 32); 0 is the background
    return torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))


def cifar_arrays(ds):
    """torchvision CIFAR10 dataset -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # stored as NHWC
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def load_cifar10(data_dir):
    import torchvision
    root = data_dir or "data/cifar10"
    try:
        return cifar_arrays(torchvision.datasets.CIFAR10(root, train=True, download=True))
    except Exception as e:
        raise UserError(f"CIFAR-10 not in {root} and could not be downloaded ({type(e).__name__}); "
                        "put cifar-10-batches-py/ there or go online") from None


def load_imagenet64(data_dir):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): train_data_batch_*.npz, data (N, 12288)
    uint8, channel-planar, labels 1..1000. The first call copies them, one file at a time, into one
    array imagenet64_train.npy (and its labels) in the same folder; every call, on every rank, then
    memory-maps it: one copy on disk, shared through the page cache, never two in memory."""
    import glob
    folder = data_dir or "data/imagenet64"
    cache, labels = (os.path.join(folder, f"imagenet64_{k}.npy") for k in ("train", "labels"))
    if DIST.rank == 0 and not os.path.exists(labels):
        files = sorted(glob.glob(os.path.join(folder, "train_data_batch_*.npz")))
        if not files:
            raise UserError(f"no train_data_batch_*.npz in {folder}; unzip "
                            "Imagenet64_train_part1.zip and _part2.zip there (image-net.org)")
        ys = [np.asarray(np.load(f)["labels"], dtype=np.int64) - 1 for f in files]  # 1..1000 -> 0..
        shape = (sum(map(len, ys)), 3, 64, 64)
        x = np.lib.format.open_memmap(cache + ".tmp", "w+", np.uint8, shape)
        start = 0
        for f, y in zip(files, ys):
            data = np.load(f)["data"]
            if data.shape != (len(y), 3 * 64 * 64):
                raise UserError(f"{f}: data is {data.shape}, expected ({len(y)}, 12288)")
            x[start:start + len(y)] = data.reshape(-1, 3, 64, 64)
            start += len(y)
        x.flush()
        os.replace(cache + ".tmp", cache)
        with open(labels + ".tmp", "wb") as fh:  # written last: its presence marks a whole cache
            np.save(fh, np.concatenate(ys))
        os.replace(labels + ".tmp", labels)
    while not os.path.exists(labels):  # other ranks wait for rank 0's copy (no collective call:
        time.sleep(1)                   # under torchrun only rank 0 runs the measuring stages)
    return np.load(cache, mmap_mode="r"), torch.from_numpy(np.load(labels))


def load_folder(data_dir, res, channels):
    """An ImageFolder tree (a sub-folder per class), resized, centre-cropped to res, in memory."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    if not data_dir or not os.path.isdir(data_dir):
        raise UserError(f"--data folder needs --data_dir naming an image folder (got {data_dir!r})")
    tf = T.Compose([T.Grayscale() if channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
                    T.Resize(res), T.CenterCrop(res), T.PILToTensor()])
    try:
        ds = ImageFolder(data_dir, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise UserError(f"no images found under {data_dir} ({str(e)[:80]})") from None
    if len(ds) == 0:
        raise UserError(f"no images found under {data_dir}")
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


def load_dataset(c):
    """uint8 images (N, C, res, res) and labels (N,) of a real-data source, checked against c."""
    loaders = dict(fmnist=lambda: load_fmnist(c.data_dir), cifar10=lambda: load_cifar10(c.data_dir),
                   imagenet64=lambda: load_imagenet64(c.data_dir),
                   folder=lambda: load_folder(c.data_dir, c.res, c.channels))
    x, y = loaders[c.data]()
    if tuple(x.shape[1:]) != (c.channels, c.res, c.res):
        raise UserError(f"{c.data} images are {tuple(x.shape[1:])}; "
                        f"set --channels {x.shape[1]} --res {x.shape[-1]}")
    if int(y.min()) < 0 or int(y.max()) >= c.num_classes:
        raise UserError(f"{c.data} has labels {int(y.min())}..{int(y.max())}; labels must lie in "
                        f"0..num_classes-1: set --num_classes {int(y.max()) + 1} or fix the labels")
    return x, y


# ------------------------------------------------------------------------------------------
#                       Plumbing: command-line flags, presets, checks
# ------------------------------------------------------------------------------------------


STAGES = ("teacher", "distill", "sample", "eval", "spectra", "bench", "report", "diagnose", "all")


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def parse_value(kind, text):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
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


def preset_config(name):
    """Config() with the named preset's values on top."""
    return dataclasses.replace(Config(), preset=name, **PRESETS[name])


def make_config(argv=None):
    """Config from --preset, then every --key value / --key=value on top of it; checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = Parser(add_help=False)
    pre.add_argument("--preset", default=Config.preset)
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        raise UserError(f"unknown preset {known.preset!r}; choose one of {', '.join(PRESETS)}")
    base = preset_config(known.preset)
    p = Parser(description=__doc__.split("\n")[0])
    comments = field_comments()
    for f in dataclasses.fields(Config):
        default = getattr(base, f.name)
        kind = type(default)
        shown = ",".join(map(str, default)) if kind is list else default
        p.add_argument(f"--{f.name}", type=lambda t, k=kind: parse_value(k, t), default=default,
                       metavar=kind.__name__.upper(),
                       help=f"{comments.get(f.name, '')} (default: {shown})".replace("%", "%%"))
    c = Config(**vars(p.parse_args(argv)))
    c.out_dir = c.out_dir or os.path.join("runs", c.preset)
    check_config(c)
    return c


def field_comments():
    """The comment after each config field, for --help (read from this file: they never drift)."""
    import inspect
    out = {}
    for cls in (TrainConfig, Config):
        for line in inspect.getsource(cls).splitlines():
            name, _, rest = line.strip().partition(":")
            if "#" in rest and name.isidentifier():
                out[name] = rest.split("#", 1)[1].strip()
    return out


def check_config(c):
    """Reject configurations that cannot work, with one line that says what to do."""
    def need(ok, message):
        if not ok:
            raise UserError(message)

    need(c.stage in STAGES, f"--stage {c.stage!r} is not one of {', '.join(STAGES)}")
    need(c.data in ("toy", "fmnist", "cifar10", "imagenet64", "folder"),
         f"--data {c.data!r} is not one of toy, fmnist, cifar10, imagenet64, folder")
    need(c.res >= 1 and c.patch >= 1 and c.channels >= 1 and c.num_classes >= 1,
         "--res, --patch, --channels and --num_classes must be positive")
    need(c.scales == sorted(set(c.scales)) and c.scales[-1:] == [c.res] and c.scales[0] >= 1,
         f"--scales {c.scales} must rise strictly and end at --res {c.res}")
    need(not any(r % c.patch for r in c.scales), f"every scale in {c.scales} must be divisible "
         f"by --patch {c.patch}")
    need(len(c.sigmas) == len(c.scales) and c.sigmas[0] == 1.0 and c.sigmas[-1] > 0 and all(
        a >= b for a, b in zip(c.sigmas, c.sigmas[1:])), f"--sigmas {c.sigmas} needs one level per "
         "scale, starting at 1.0, never rising, above 0")
    need(c.hidden >= 8 and c.hidden % 4 == 0 and c.heads >= 1 and c.hidden % c.heads == 0,
         "--hidden must be a multiple of 4, at least 8, and divisible by --heads")
    need(1 <= c.feat_block <= c.depth, f"--feat_block must lie in 1..--depth ({c.depth})")
    for name in ("dmd_s", "fake_s", "mmd_s"):
        v = getattr(c, name)
        need(len(v) == 2 and 0 <= v[0] <= v[1] <= 1, f"--{name} {v} must be low,high with "
             "0 <= low <= high <= 1")
    need(c.schedule in ("hand", "auto") and c.schedule_margin > 0,
         "--schedule must be hand or auto, and --schedule_margin positive")
    need(c.mmd_kernel in ("linear", "rbf") and c.scale_pick in ("cycle", "random"),
         "--mmd_kernel must be linear or rbf, --scale_pick cycle or random")
    need(c.fake_loss in ("x0", "v"), "--fake_loss must be x0 (SwD) or v (the teacher's loss)")
    need(c.precision in ("", "fp32", "bf16"), "--precision must be fp32 or bf16 ('' = the default)")
    need(c.flip in ("auto", "true", "false"), "--flip must be true, false or auto")
    need(c.teacher_target == "sample" or (c.teacher_target == "exact" and c.data == "toy"),
         "--teacher_target must be sample, or exact (toy data only)")
    need(c.data != "toy" or c.num_classes <= 4, "the toy world has 1 to 4 classes (--num_classes)")
    need(c.teacher != "toy" or c.data == "toy", "--teacher toy is the exact toy-world denoiser; "
         "it needs --data toy")
    for name in ("lr", "distill_lr", "fake_lr", "sigma_data", "cfg", "weight_decay", "grad_clip",
                 "logit_std", "dmd_weight", "gan_weight", "gan_d_weight", "mmd_weight",
                 "mmd_sigma"):
        need(getattr(c, name) >= 0, f"--{name} must not be negative")
    for name in ("ema", "distill_ema", "class_dropout"):
        need(0 <= getattr(c, name) < 1, f"--{name} must lie in [0, 1)")
    for name in ("teacher_steps", "batch", "distill_steps", "distill_batch", "fake_updates",
                 "n_samples", "eval_n", "eval_every_n", "eval_batch", "bench_n", "bench_repeats",
                 "seeds", "depth", "log_every", "sample_steps"):
        need(getattr(c, name) >= 1, f"--{name} must be at least 1")
    for name in ("eval_every", "eval_ref", "ckpt_every", "sample_every", "warmup"):
        need(getattr(c, name) >= 0, f"--{name} must be 0 (off) or positive")


if __name__ == "__main__":
    main()
