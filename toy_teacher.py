"""toy_teacher.py: a closed-form teacher, i.e. the exact denoiser of a known image distribution.

The world is a Gaussian mixture in pixel space, at any resolution r of a scale schedule:

    x0 ~ sum_k pi_k N(mu_k, Sigma),
        mu_k: a prototype image (a coloured shape on a coloured background),
        Sigma: a stationary Gaussian field with power spectrum P(f) ~ f^-2.

Components carry class labels, several components per class. Under the flow-matching convention of
SwD, x_t = (1-s) x0 + s eps, every quantity is exact: samples, the posterior mean E[x0|x_t] (so the
velocity and, by Tweedie, the score) and log p_s(x_t) with all constants. Sigma is circulant, so the
unitary (norm="ortho") FFT diagonalises it: Sigma = F^H diag(P) F, and all linear algebra is per
frequency.

Scales. The world at resolution r is the `area` down-sampling A_r of the full-resolution world:
  means  mu_k^(r) = A_r mu_k                                    (exact at every r);
  field  P_r(k')  = sum_k P(k) |(F_r A_r F_R^H)[k', k]|^2       (separable, per axis).
For integer factors R/r (32 -> 16, 8) A_r Sigma A_r^T is circulant and P_r is exact. For a
non-integer factor (32 -> 24) A_r Sigma A_r^T is not quite circulant; P_r is its diagonal in the
Fourier basis, the nearest circulant covariance: the total variance is kept exactly, the
cross-frequency terms that the uneven 2-pixel windows create are dropped (at 24 px they are about
14% of the covariance's Frobenius norm; `test_scale_consistency_with_area_downsampling` measures
it). Within one resolution, sample, denoise and log_prob are always mutually exact.

    t = ToyTeacher(); x, y = t.sample(16, 32); x0_hat = t.denoise(x_t, s); t.evaluate(x)
"""
import math

import torch
import torch.nn.functional as F


def _shape_masks(R, supersample=4):
    """Anti-aliased masks (4, R, R) in [0, 1]: disk, square, triangle, ring, drawn at 4x and
    area-averaged."""
    n = R * supersample
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    rr = (xx ** 2 + yy ** 2).sqrt()
    disk = rr < 0.6
    square = (xx.abs() < 0.5) & (yy.abs() < 0.5)
    # apex up, base at y = 0.5 (image y points down)
    triangle = (yy < 0.5) & (yy > -0.6 + 2.2 * xx.abs())
    ring = (rr < 0.75) & (rr > 0.4)
    masks = torch.stack([disk, square, triangle, ring]).double()[:, None]
    return F.avg_pool2d(masks, supersample)[:, 0]


class ToyTeacher:
    """Exact Gaussian-mixture image world. Components: `num_classes` shapes x `per_class` colour
    schemes."""

    def __init__(self, res=32, num_classes=4, per_class=2, channels=3, field_std=0.15, slope=2.0,
                 seed=0):
        assert 1 <= num_classes <= 4, "the toy world has 4 shapes: disk, square, triangle, ring"
        self.res, self.channels, self.num_classes = res, channels, num_classes
        g = torch.Generator().manual_seed(seed)
        K = num_classes * per_class
        # colours in [-0.7, 0.7]
        fg = torch.rand(K, channels, generator=g, dtype=torch.float64) * 1.4 - 0.7
        bg = torch.rand(K, channels, generator=g, dtype=torch.float64) * 1.4 - 0.7
        fg = torch.where((fg - bg).abs() < 0.4, -bg.sign() * 0.6, fg)  # keep every shape visible
        self.comp_class = torch.arange(K) // per_class  # (K,) class label of each component
        m = _shape_masks(res)[self.comp_class][:, None]  # (K, 1, R, R)
        self.mu = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m  # (K, C, R, R)
        self.log_pi = torch.full((K,), -math.log(K), dtype=torch.float64)  # uniform mixture weights
        f = torch.fft.fftfreq(res, dtype=torch.float64)  # cycles per pixel
        f2 = f[:, None] ** 2 + f[None, :] ** 2
        P = (f2 + 1.0 / res ** 2) ** (-slope / 2)  # power law, finite at DC
        self.P = P * field_std ** 2 / P.mean()  # per-pixel variance = spectrum mean = field_std^2
        self._cache = {}

    # ------------------------------------------------------------ the world at resolution r
    def scale(self, r):
        """(mu_r (K, C, r, r), P_r (r, r)) of the world at resolution r, cached. See the module
        docstring."""
        if r not in self._cache:
            R = self.res
            eye = torch.eye(R, dtype=torch.float64)[:, None]
            A = F.adaptive_avg_pool1d(eye, r)[:, 0].T  # (r, R): area down-sampling along one axis
            Fr, FR = (torch.fft.fft(torch.eye(n, dtype=torch.complex128), norm="ortho")
                      for n in (r, R))
            Q = (Fr @ A.to(torch.complex128) @ FR.conj().T).abs() ** 2  # (r, R) power transfer
            mu_r = F.interpolate(self.mu, size=(r, r), mode="area")
            self._cache[r] = (mu_r, Q @ self.P @ Q.T)
        return self._cache[r]

    def _mask(self, y, B):
        """(B, K) log mixture weights, restricted to the components of class y. y=None, or a label
        >= num_classes (the CFG null class), keeps every component."""
        log_pi = self.log_pi.expand(B, -1)
        if y is None:
            return log_pi
        y = y.reshape(-1, 1).cpu()
        keep = (self.comp_class[None, :] == y) | (y >= self.num_classes)
        return (log_pi + torch.where(keep, 0.0, -math.inf)).log_softmax(-1)

    def sample(self, n, res=None, y=None, generator=None):
        """n exact samples (n, C, r, r) and their labels (n,). y: optional (n,) class labels to
        condition on."""
        r = res or self.res
        mu_r, P_r = self.scale(r)
        # the component of each sample
        k = torch.multinomial(self._mask(y, n).exp(), 1, generator=generator)[:, 0]
        eps = torch.randn(n, self.channels, r, r, generator=generator, dtype=torch.float64)
        field = torch.fft.ifft2(P_r.sqrt() * torch.fft.fft2(eps, norm="ortho"), norm="ortho").real
        return (mu_r[k] + field).float(), self.comp_class[k]

    # ------------------------------------------------------------ exact posterior quantities
    def _posterior(self, x_t, s, y=None):
        """Responsibilities w (B, K), mean E[x0|x_t] and log p_s(x_t), x_t = (1-s) x0 + s eps."""
        B, C, r = x_t.shape[0], x_t.shape[1], x_t.shape[-1]
        mu_r, P_r = self.scale(r)
        x = x_t.double()
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1, 1).expand(B, 1, 1, 1)
        a = 1 - s  # signal scale
        v = a ** 2 * P_r + s ** 2  # (B, 1, r, r) variance of x_t per frequency, given the component
        X = torch.fft.fft2(x, norm="ortho")  # (B, C, r, r)
        M = torch.fft.fft2(mu_r, norm="ortho")  # (K, C, r, r)
        # Mahalanobis |X - a M|^2 / v, expanded so that no (B, K, C, r, r) tensor is formed
        xx = (X.abs() ** 2 / v).sum((1, 2, 3))[:, None]  # (B, 1)
        xm = torch.einsum("bchw,kchw->bk", X / v, M.conj()).real  # (B, K)
        mm = torch.einsum("bhw,kchw->bk", 1 / v[:, 0], M.abs() ** 2)  # (B, K)
        quad = xx - 2 * a.reshape(-1, 1) * xm + a.reshape(-1, 1) ** 2 * mm  # (B, K)
        logdet = C * v.log().sum((1, 2, 3))[:, None]  # (B, 1)
        log_joint = self._mask(y, B) - 0.5 * (quad + logdet + C * r * r * math.log(2 * math.pi))
        log_p = log_joint.logsumexp(-1)  # (B,)
        w = (log_joint - log_p[:, None]).exp()  # (B, K)
        m_bar = torch.einsum("bk,kchw->bchw", w, mu_r)  # posterior-weighted prototype
        gain = a * P_r / v  # Wiener gain of the shared field, per frequency
        resid = torch.fft.fft2(x - a * m_bar, norm="ortho")
        x0 = m_bar + torch.fft.ifft2(gain * resid, norm="ortho").real
        return w, x0, log_p

    def denoise(self, x_t, s, y=None):
        """Exact posterior mean E[x0 | x_t] (B, C, r, r). s: float or (B,) noise level; y: optional
        labels."""
        return self._posterior(x_t, s, y)[1].to(x_t.dtype)

    def velocity(self, x_t, s, y=None):
        """Exact E[eps - x0 | x_t] = (x_t - E[x0|x_t]) / s, the flow-matching target."""
        s_ = torch.as_tensor(s, dtype=x_t.dtype).reshape(-1, 1, 1, 1)
        return (x_t - self.denoise(x_t, s, y)) / s_

    def log_prob(self, x_t, s, y=None):
        """Exact log-density (nats) of the noised marginal p_s at x_t, constants included: (B,)."""
        return self._posterior(x_t, s, y)[2]

    def euler(self, n, steps, res=None, y=None, generator=None):
        """Probability-flow Euler with the exact velocity, s: 1 -> 0 on a uniform grid. Returns
        (n, C, r, r)."""
        r = res or self.res
        x = torch.randn(n, self.channels, r, r, generator=generator, dtype=torch.float64)
        s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        for i in range(steps):
            x = x + (s[i + 1] - s[i]) * self.velocity(x, s[i], y)  # dx = v ds
        return x.float()

    # ------------------------------------------------------------ exact metrics
    def frechet(self, x):
        """Frechet distance between the Gaussian fit of x (n, C, R, R) and the exact mixture
        moments.

        tr sqrt(S^1/2 C1 S^1/2) equals the sum of sqrt(eig(Xc S Xc^T / (n-1))), an n x n problem in
        which S (field + spread of the prototypes) is applied through the FFT: no D x D matrix is
        ever formed.
        """
        n, C, r = x.shape[0], x.shape[1], x.shape[-1]
        mu_r, P_r = self.scale(r)
        pi = self.log_pi.exp()
        m = torch.einsum("k,kchw->chw", pi, mu_r)
        d = (mu_r - m).reshape(len(pi), -1)  # (K, D) prototype spread
        X = x.double().reshape(n, -1)
        xc = X - X.mean(0)
        xs = torch.fft.fft2(xc.reshape(x.shape), norm="ortho")
        xs = torch.fft.ifft2(P_r.sqrt() * xs, norm="ortho").real.reshape(n, -1)
        b = (xc @ d.T) * pi.sqrt()  # (n, K)
        M = (xs @ xs.T + b @ b.T) / (n - 1)
        tr_cross = torch.linalg.eigvalsh(M).clamp(min=0).sqrt().sum()
        tr_s = C * P_r.sum() + (pi[:, None] * d ** 2).sum()
        tr_x = (xc ** 2).sum() / (n - 1)
        return float(((X.mean(0) - m.reshape(-1)) ** 2).sum() + tr_x + tr_s - 2 * tr_cross)

    def assign(self, x, s_read=0.3):
        """Component of each clean image, read at noise level s_read without added noise
        (deterministic).

        Reading at s = 0 is fragile: tiny high-frequency errors look like outliers under the f^-2
        field.
        x_t = (1-s) x is the mixture with Sigma inflated by (s/(1-s))^2 I, which masks them.
        """
        return self._posterior((1 - s_read) * x.double(), s_read)[0].argmax(-1)

    def evaluate(self, x, s_read=0.3):
        """Exact metrics of generated images x (n, C, R, R): Frechet distance (two-sided fidelity),
        NLL in nats per dimension at s = 0 (one-sided: collapse to the means scores well),
        mode-histogram KL against the true weights, and the number of modes hit."""
        D = x[0].numel()
        K = len(self.log_pi)
        h = torch.bincount(self.assign(x, s_read), minlength=K).double() / len(x)
        kl = (h * (h.clamp(min=1e-12).log() - self.log_pi)).sum()
        nll = -self.log_prob(x, 0.0).mean() / D
        return dict(fd=self.frechet(x), nll=float(nll), mode_kl=float(kl),
                    modes_hit=int((h > 0).sum()))

    def noise_floor(self, n, seed=0):
        """The metrics of n independent exact samples: what a perfect generator scores at this
        sample size."""
        return self.evaluate(self.sample(n, generator=torch.Generator().manual_seed(seed))[0])

    @torch.no_grad()
    def mode_entropy(self, r, levels, n=512, seed=0):
        """Entropy (bits) of the exact posterior's within-class component weights at each noise
        level s, for real images at resolution r: [entropy for s in levels].

        DMD can move probability between two modes of a class only at levels where x_t does not yet
        tell them apart (entropy > 0); 1 bit = two equally likely components. This is why
        full-resolution DMD2 collapses within classes (README, "Convergence").
        """
        g = torch.Generator().manual_seed(seed)
        x0, y = self.sample(n, r, generator=g)
        out = []
        for s in levels:
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            w = self._posterior((1 - s) * x0.double() + s * eps, s, y)[0]  # (n, K), 0 off the class
            bits = -(w * w.clamp(min=1e-300).log2()).sum(-1).mean()
            out.append(max(0.0, float(bits)))  # max: no -0.00
        return out


class ToyScore(torch.nn.Module):
    """The exact velocity, called like a DiT (x, s, y): the perfect real score for exact DMD."""

    def __init__(self, toy):
        super().__init__()
        self.toy, self.num_classes = toy, toy.num_classes

    def forward(self, x, s, y):
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return self.toy.velocity(x.detach().cpu().double(), s.cpu(), y.cpu()).to(x)


# ------------------------------------------------------------ command line: grid + Euler table
def save_scale_grid(teacher, path, scales=(8, 16, 24, 32), n=8, seed=0):
    """One row per scale (nearest-upsampled to full size for display), the same component order
    in each row."""
    from torchvision.utils import save_image  # lazy: the teacher itself needs torch only

    rows = []
    for r in scales:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % teacher.num_classes
        x, _ = teacher.sample(n, r, y=y, generator=g)
        rows.append(F.interpolate(x, size=64, mode="nearest"))  # 64 px for display
    save_image(torch.cat(rows) * 0.5 + 0.5, path, nrow=n, padding=1)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Toy world: a sample grid per scale and exact-Euler "
                                "metrics.")
    p.add_argument("--grid", default="assets/toy_world.png",
                   help="where to write the per-scale sample grid")
    p.add_argument("--n", type=int, default=2000, help="samples per metric row")
    p.add_argument("--steps", default="1,2,4,8,32", help="Euler step counts to measure")
    a = p.parse_args()
    t = ToyTeacher()
    save_scale_grid(t, a.grid)
    print(f"wrote {a.grid}")
    rows = [("exact samples", t.noise_floor(a.n, seed=1))]
    for k in map(int, a.steps.split(",")):
        x = t.euler(a.n, k, generator=torch.Generator().manual_seed(2))
        rows.append((f"Euler {k} steps", t.evaluate(x)))
    print(f"{'sampler':16s} {'FD':>9s} {'NLL/dim':>9s} {'mode KL':>8s} {'modes':>6s}   (n={a.n})")
    for name, m in rows:
        print(f"{name:16s} {m['fd']:9.2f} {m['nll']:9.3f} {m['mode_kl']:8.4f} {m['modes_hit']:6d}")
