"""The functions people paste into coursework run alone: given only `import torch` and
`import torch.nn.functional as F`, each one's source gives the same numbers as the module's."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import swd_mini as sm
from toy_teacher import ToyTeacher


def pasted(fn):
    """fn's source executed in a fresh namespace that holds torch and F and nothing else."""
    namespace = {"torch": torch, "F": F}
    exec(inspect.getsource(fn), namespace)
    return namespace[fn.__name__]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_rapsd_alone():
    x = ToyTeacher().sample(16, generator=gen(0))[0]
    for a, b in zip(pasted(sm.rapsd)(x), sm.rapsd(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scales", [[8, 16, 24, 32], [32, 32, 32, 32]])
def test_scale_wise_inputs_and_sampler_alone(scales):
    x = ToyTeacher().sample(4, generator=gen(1))[0]
    levels = [1.0, 0.75, 0.5, 0.25]
    for i in range(4):
        eps = torch.randn(4, 3, scales[i], scales[i], generator=gen(i))
        for a, b in zip(pasted(sm.scale_wise_inputs)(x, i, scales, levels, eps),
                        sm.scale_wise_inputs(x, i, scales, levels, eps)):
            assert torch.equal(a, b)

    def denoise(z, s):  # any denoiser will do: a fixed blur of the input
        return (1 - s) * F.avg_pool2d(z, 3, 1, 1)

    noise = torch.randn(4, 3, scales[0], scales[0], generator=gen(2))
    a = pasted(sm.scale_wise_sample)(denoise, noise, scales, levels, gen(3))
    b = sm.scale_wise_sample(denoise, noise, scales, levels, gen(3))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)


def test_losses_alone():
    g = gen(4)
    x0_hat = torch.randn(3, 3, 8, 8, generator=g, requires_grad=True)
    mu_real, mu_fake = torch.randn(2, 3, 3, 8, 8, generator=g)
    assert torch.equal(pasted(sm.dmd_loss)(x0_hat, mu_real, mu_fake),
                       sm.dmd_loss(x0_hat, mu_real, mu_fake))
    fake, real = torch.randn(2, 3, 16, 24, generator=g)
    for kernel in ("linear", "rbf"):
        for pooled in (False, True):
            assert torch.equal(pasted(sm.patch_mmd)(fake, real, kernel, pooled=pooled),
                               sm.patch_mmd(fake, real, kernel, pooled=pooled))
