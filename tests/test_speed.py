"""Distillation that pays on a GPU, measured on the CPU: backend ops (about one kernel launch each
on a GPU) and host syncs per iteration at the cifar10 shape, and the batched calls that cut them
proved equal to a plain transcription of the same iteration."""
import dataclasses
import sys

import pytest
import torch

import swd_mini as sm

CPU = torch.device("cpu")


def reference_iteration(st, real, data, c, i, guard):
    """One SwD iteration written plainly, drawing the same random numbers in the same order: the
    generator called once per fake update, CFG as two calls, the fake network's score and its
    tokens from separate calls, the head once per set, fp32 weights under autocast."""
    U, B, dev, k, lv = c.fake_updates, c.distill_batch, data.device, c.feat_block, c.levels[i]

    def fake_v(x, s, y):  # the residual fake score: the real score plus the correction c_out F
        with torch.no_grad():
            base = real(x, s, y)
        return base + st.fake(x, s, y, skip=False)
    st.fake.requires_grad_(True)
    st.head.requires_grad_(True)
    x, y = data.batch(U * B)
    x_in, target = sm.generator_inputs(st.gen, x, y, i, c)
    s, eps = torch.empty(len(y), device=dev).uniform_(*c.fake_levels), torch.randn_like(target)
    params, out = [*st.fake.parameters(), *st.head.parameters()], []
    for u in range(U):
        j = slice(u * B, (u + 1) * B)
        with torch.no_grad(), sm.autocast(dev, c.precision):
            x0_g = sm.to_x0(x_in[j], lv, st.gen(x_in[j], lv, y[j])).float()
        with sm.autocast(dev, c.precision):
            x_s = sm.noised(x0_g, s[j], eps[j])
            v, feat_fake = fake_v(x_s, s[j], y[j]), st.fake.features(x_s, s[j], y[j], k)
            err = (sm.to_x0(x_s, s[j], v).float() - x0_g).pow(2).mean((1, 2, 3))
            loss_fake = (sm.fake_loss_weight(s[j], c.fake_loss, c.sigma_data) * err).mean()
            feat_real = st.fake.features(sm.noised(target[j], s[j], eps[j]), s[j], y[j], k)
            loss_d = sm.gan_discriminator_loss(st.head(feat_real), st.head(feat_fake))
        (loss_fake + c.gan_d_weight * loss_d).backward()
        out.append(sm.update(st.opt_fake, params, 10.0, guard, 0, fake=loss_fake.detach(),
                             disc=loss_d.detach())[0])
    st.fake.requires_grad_(False)
    st.head.requires_grad_(False)
    x, y = data.batch(B)
    x_in, target = sm.generator_inputs(st.gen, x, y, i, c)
    s_d, s_m = (torch.empty(B, device=dev).uniform_(*lh) for lh in (c.dmd_levels, c.mmd_levels))
    eps_d, eps_m = torch.randn_like(target), torch.randn_like(target)
    with sm.autocast(dev, c.precision):
        x0_hat = sm.to_x0(x_in, lv, st.gen(x_in, lv, y)).float()
        x_d = sm.noised(x0_hat, s_d, eps_d)
        with torch.no_grad():
            v_c, v_u = real(x_d, s_d, y), real(x_d, s_d, torch.full_like(y, c.num_classes))
            mu_real = sm.to_x0(x_d, s_d, v_u + c.cfg * (v_c - v_u)).float()
            mu_fake = sm.to_x0(x_d, s_d, fake_v(x_d, s_d, y)).float()
        dmd = sm.dmd_loss(x0_hat, mu_real, mu_fake)
        gan = sm.gan_generator_loss(st.head(st.fake.features(x_d, s_d, y, k)))
        f_gen = st.fake.features(sm.noised(x0_hat, s_m, eps_m), s_m, y, k).float()
        with torch.no_grad():
            f_real = st.fake.features(sm.noised(target, s_m, eps_m), s_m, y, k).float()
        mmd = sm.patch_mmd(f_gen, f_real, c.mmd_kernel, c.mmd_bandwidth)
    (c.dmd_weight * dmd + c.gan_weight * gan + c.mmd_weight * mmd).backward()
    terms = sm.update(st.opt_gen, list(st.gen.parameters()), 10.0, guard, 0, dmd=dmd.detach(),
                      gan=gan.detach(), mmd=mmd.detach())[0]
    return dict(terms, fake_first=out[0]["fake"], fake=out[-1]["fake"], disc=out[-1]["disc"])


def two_cycles(c, plain):
    """Two 4-scale cycles from one seed: the loss rows and every trained weight, flat."""
    torch.manual_seed(0)
    real = sm.DiT.from_config(c).requires_grad_(False)
    torch.nn.init.normal_(real.out.weight, std=0.05)  # a real score that is not just c_skip x_t
    torch.manual_seed(1)
    data, st, guard = sm.Data(c, CPU), sm.Student.start(c, CPU, real), sm.Guard()
    step = reference_iteration if plain else sm.distill_iteration
    real = real if plain else sm.frozen_copy(real, c, CPU)  # bf16: Linear weights stored in bf16
    rows = [step(st, real, data, c, it % 4, guard) for it in range(8)]
    return rows, torch.cat([p.detach().flatten() for m in (st.gen, st.fake, st.head)
                            for p in m.parameters()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_batched_iteration_computes_what_the_plain_one_computes(precision):
    base = ["--preset", "smoke", "--cfg", "2.0", "--fake_loss", "eps", "--precision", precision]
    # frozen weights (learning rate 0): every loss of every pass is bit-identical
    c = sm.make_config(base + ["--distill_lr", "0"])
    (new, _), (old, _) = two_cycles(c, False), two_cycles(c, True)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(new, old) for k in a)
    # trained: gradients summed in another order differ by rounding, which Adam's normalisation
    # of near-zero gradients can turn into whole steps: fp32 within 1e-6, bf16 within 1e-3
    c = sm.make_config(base)
    (_, w_new), (_, w_old) = two_cycles(c, False), two_cycles(c, True)
    assert (w_new - w_old).abs().max() < (1e-6 if precision == "fp32" else 1e-3)
    assert (w_new - two_cycles(dataclasses.replace(c, distill_lr=0.0), False)[1]).abs().max() > 1e-3


def counts(c, fn, per):
    fn()
    with sm.OpCounter() as m:
        fn()
    return m.ops / per, m.syncs / per


def test_ops_and_host_syncs_per_iteration_at_the_cifar10_shape():
    """The budgets of the cifar10 shape in bf16 (depth 12, patch 2, feature block 6, CFG 2; width
    and batch do not change the counts): an SwD iteration <= 7,500 ops (7,414 today) and <= 1
    host sync, a teacher step <= 1,150 ops (1,128 today)."""
    c = sm.make_config(["--preset", "cifar10", "--precision", "bf16", "--out_dir", "unused"])
    c = dataclasses.replace(c, hidden=48, batch=2, distill_batch=2)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    data, guard = sm.Data(c, CPU, (images, torch.arange(64) % 10)), sm.Guard()
    real = sm.frozen_copy(sm.DiT.from_config(c).requires_grad_(False), c, CPU)
    st = sm.Student.start(c, CPU, real)
    ops, syncs = counts(c, lambda: [sm.distill_iteration(st, real, data, c, i, guard)
                                    for i in range(4)], 4)
    assert ops <= 7500 and syncs <= 1, (ops, syncs)
    model = sm.DiT.from_config(c)
    ema, opt = sm.copy.deepcopy(model).requires_grad_(False), torch.optim.AdamW(
        model.parameters(), fused=True)
    ops, syncs = counts(c, lambda: [sm.teacher_step(j, model, model, ema, opt, data, c, guard)
                                    for j in range(4)], 4)
    assert ops <= 1150 and syncs <= 1, (ops, syncs)


def test_the_counter_sees_launches_and_host_syncs():
    x = torch.ones(4)
    with sm.OpCounter() as m:
        y = (x * 2 + 1).sum()  # three kernels
        y.view(1)  # a view is free
        float(y)  # a read back to Python
        torch.tensor([1.0, 2.0])  # Python data to a tensor
    assert (m.ops, m.syncs) == (3, 2)


def test_the_counter_sees_inside_compiled_graphs():
    """Compiled code runs compiled under the counter: its library call (the matmul) reaches it as
    an op, its fused kernel (relu and the product in one) comes from the profiler: 2 launches
    where eager makes 3."""
    import torch._inductor.config as inductor
    w, x = torch.randn(64, 64), torch.randn(64, 64)
    f = torch.compile(lambda x: (x @ w).relu() * 2)
    with inductor.patch({"cpp.enable_kernel_profile": True}):  # while compiling
        f(x)
    with sm.OpCounter() as eager:
        (x @ w).relu() * 2
    with sm.OpCounter(fused=True) as comp:
        f(x)
    assert (eager.ops, comp.ops) == (3, 2)


def test_compiled_distillation_steps_equal_eager_ones():
    """--compile true on distillation: the generator's and the fake network's calls and both
    halves' losses through torch.compile (graphs per scale and batch shape; a break around the
    exact toy score) give eager's losses and weights."""
    c = sm.make_config(["--preset", "smoke", "--teacher", "toy", "--scales", "16,32", "--levels", "1,0.5",
                        "--fake_updates", "1", "--compile", "true"])
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        start = sm.DiT.from_config(c).requires_grad_(False)
        torch.manual_seed(1)
        data, st, guard = sm.Data(c, CPU), sm.Student.start(c, CPU, start), sm.Guard()
        real = sm.load_real_score(c, CPU)  # the exact toy velocity: not a network, not compiled
        if compile_:
            sm.compiled(st.gen, c), sm.compiled(st.fake, c)
        rows = [sm.distill_iteration(st, real, data, c, it % 2, guard) for it in range(2)]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        rows += [sm.distill_iteration(st, real, data, c, it % 2, guard) for it in range(2)]
        # the second cycle runs the first one's graphs: nothing recompiles (a guard on the
        # position-embedding cache once made every graph compile twice)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        runs.append((rows, torch.cat([p.detach().flatten() for m in (st.gen, st.fake, st.head)
                                      for p in m.parameters()])))
    (eager, w_eager), (comp, w_comp) = runs
    for a, b in zip(eager, comp):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + 1e-7, k
    assert (w_eager - w_comp).abs().max() < 1e-4


def test_stacked_modulation_equals_each_blocks_own():
    """DiT.modulation (every block's adaLN Linear as one matmul) gives each block's ada(cond), and
    the tokens of features() are forward's, rows= or not."""
    torch.manual_seed(0)
    c = sm.make_config(["--preset", "smoke", "--depth", "3", "--feat_block", "2"])
    net = sm.DiT.from_config(c)
    for p in net.parameters():  # live adaLN weights (adaLN-Zero starts them at 0)
        torch.nn.init.normal_(p, std=0.05)
    cond = torch.randn(5, c.hidden)
    own = torch.stack([b.ada(cond) for b in net.blocks])
    assert torch.allclose(net.modulation(cond), own, atol=1e-6)
    assert torch.allclose(net.modulation(cond, 2), own[:2], atol=1e-6)
    x, s, y = torch.randn(5, 3, 16, 16), torch.rand(5), torch.arange(5) % c.num_classes
    v, feats = net(x, s, y, feat_block=2)
    v3, feats3 = net(x, s, y, feat_block=2, rows=3)
    assert torch.allclose(net.features(x, s, y, 2), feats, atol=1e-6)
    assert torch.allclose(feats3, feats, atol=1e-6) and torch.allclose(v3, v[:3], atol=1e-5)
