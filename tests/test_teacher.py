"""swd_mini part 1: config/CLI, data loaders, the DiT, the multi-scale teacher, sampling, checkpoints."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import swd_mini as sm
from toy_teacher import ToyTeacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "swd_mini.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def small_dit(**kw):
    c = sm.Config(**{**sm.PRESETS["smoke"], **kw})
    return sm.DiT.from_config(c), c


# ------------------------------------------------------------------ config and CLI
def test_cli_list_and_equals_forms_and_preset_defaults():
    c = sm.make_config(["--preset", "smoke", "--scales=16,32", "--sigmas", "1.0,0.5", "--lr=0.002", "--resume", "true"])
    assert c.scales == [16, 32] and c.sigmas == [1.0, 0.5] and c.lr == 0.002 and c.resume is True
    assert c.hidden == sm.PRESETS["smoke"]["hidden"] and c.out_dir == os.path.join("runs", "smoke")


def test_help_lists_every_field_with_its_default():
    out = " ".join(run_cli("--help").stdout.split())  # undo line wrapping
    for f in sm.dataclasses.fields(sm.Config):
        assert f"--{f.name}" in out
    assert "(default: 8,16,24,32)" in out and "(default: 0.002)" in out


# ------------------------------------------------------------------ data loaders on fabricated files
def write_idx(path, arr, magic):
    header = magic.to_bytes(4, "big") + len(arr).to_bytes(4, "big")
    if arr.ndim == 3:
        header += arr.shape[1].to_bytes(4, "big") + arr.shape[2].to_bytes(4, "big")
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fmnist_reads_raw_idx_gz_and_pads(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, 2051)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5), 2049)
    x, y = sm.load_fmnist(str(tmp_path))
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0, 2:30, 2:30].numpy(), imgs) and x[:, :, :2].sum() == 0
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_imagenet64_npz_is_channel_planar_and_one_based(tmp_path):
    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, (3, 3, 64, 64)).astype(np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=imgs.reshape(3, -1), labels=[1, 1000, 7], mean=np.zeros(12288))
    np.savez(tmp_path / "train_data_batch_2.npz", data=imgs[:1].reshape(1, -1), labels=[2], mean=np.zeros(12288))
    x, y = sm.load_imagenet64(str(tmp_path))  # builds the one-array cache, then memory-maps it
    assert np.array_equal(np.asarray(x[:3]), imgs) and y.tolist() == [0, 999, 6, 1]
    assert isinstance(x, np.memmap) and os.path.exists(tmp_path / "imagenet64_train.npy")
    x2, y2 = sm.load_imagenet64(str(tmp_path))  # the second call reads the cache
    assert np.array_equal(np.asarray(x2), np.asarray(x)) and torch.equal(y2, y)
    with pytest.raises(sm.UserError, match="train_data_batch"):
        sm.load_imagenet64(str(tmp_path / "empty"))


def test_cifar_arrays_convert_nhwc_and_missing_data_is_a_user_error(tmp_path, monkeypatch):
    class Stub:  # what torchvision.datasets.CIFAR10 exposes: data (N, 32, 32, 3) uint8, targets list
        data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
        targets = [3, 9]
    x, y = sm.cifar_arrays(Stub())
    assert x.shape == (2, 3, 32, 32) and x[1, 2, 5, 7] == Stub.data[1, 5, 7, 2] and y.tolist() == [3, 9]
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(sm.UserError, match="cifar-10-batches-py"):
        sm.load_cifar10(str(tmp_path))


def test_folder_loader_resizes(tmp_path):
    from PIL import Image
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
        Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / cls / "0.png")
    c = sm.Config(data="folder", data_dir=str(tmp_path), res=16, scales=[8, 16], sigmas=[1.0, 0.5], num_classes=2)
    x, y = sm.load_dataset(c)
    assert x.shape == (2, 3, 16, 16) and (x == 200).all() and y.tolist() == [0, 1]


@pytest.mark.skipif(not os.path.exists(sm.FMNIST_DEBIAN), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian_package():
    c = sm.make_config(["--preset", "fmnist"])
    x, y = sm.load_dataset(c)
    assert x.shape == (60000, 1, 32, 32) and sorted(y.unique().tolist()) == list(range(10))
    assert 54 < x.float().mean() < 58  # mean pixel 72.9 over 28x28, times 784/1024 after zero padding


# ------------------------------------------------------------------ the model
def test_dit_shapes_at_every_scale_and_zero_init_output():
    model, c = small_dit()
    for r in c.scales:
        x = torch.randn(2, c.channels, r, r)
        v, feats = model(x, torch.rand(2), torch.tensor([0, 1]), feat_block=1)
        assert v.shape == x.shape and feats.shape == (2, (r // c.patch) ** 2, c.hidden)
        # adaLN-Zero: the output layer starts at zero, so the velocity is the preconditioning's c_skip x_t alone
        assert model(x, 0.3, torch.tensor([0, 1]), skip=False).abs().max() == 0
        torch.testing.assert_close(model(x, 0.3, torch.tensor([0, 1])), sm.precondition(torch.full((2,), 0.3), 0.5)[1] * x)
        torch.testing.assert_close(model.features(x, torch.rand(2) * 0 + 0.3, torch.tensor([0, 1]), 1),
                                   model(x, 0.3, torch.tensor([0, 1]), feat_block=1)[1])


def test_preconditioning_gives_unit_variance_input_and_target():
    # x0 with std sd, eps white: c_in x_t and the network's target (v - c_skip x_t) / c_out both have unit
    # variance at every level, and c_skip is the least-squares coefficient of v on x_t
    g = torch.Generator().manual_seed(0)
    for s in (0.05, 0.3, 0.6, 0.95):
        x0, eps = 0.4 * torch.randn(200000, generator=g), torch.randn(200000, generator=g)
        x_t, v = (1 - s) * x0 + s * eps, eps - x0
        c_in, c_skip, c_out = (t.item() for t in sm.precondition(torch.tensor([s]), 0.4))
        assert abs((c_in * x_t).std() - 1) < 0.01 and abs(((v - c_skip * x_t) / c_out).std() - 1) < 0.01
        assert abs(c_skip - (v * x_t).mean() / (x_t * x_t).mean()) < 0.03


def test_positions_are_relative_to_the_image():
    # token 0 of a 2x2 grid and token 1 of a 6x6 grid both sit at 1/4 of the image: same embedding
    a = sm.pos_embedding_2d(2, 64, 8, "cpu").reshape(2, 2, 64)
    b = sm.pos_embedding_2d(6, 64, 8, "cpu").reshape(6, 6, 64)
    torch.testing.assert_close(a[0, 0], b[1, 1])
    assert (a[0, 1] - b[0, 1]).abs().max() > 0.1


def test_euler_sampler_equals_the_toy_teachers_own_euler():
    t = ToyTeacher()
    noise = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, traj = sm.euler_sample(lambda x, s: t.velocity(x, s), noise.clone(), 8, return_trajectory=True)
    theirs = t.euler(6, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours.float(), theirs, atol=1e-5, rtol=0)
    assert len(traj) == 9 and traj[0] is noise or torch.equal(traj[0], noise)


# ------------------------------------------------------------------ the teacher, end to end
def test_compiled_teacher_steps_equal_eager_ones():
    """--compile true (what bench times on a GPU): two teacher steps, at 8 px then 16 px (a
    recompile), through torch.compile give eager's losses and weights."""
    c, cpu = sm.make_config(["--preset", "smoke"]), torch.device("cpu")
    data, runs = sm.Data(c, cpu), []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = sm.DiT.from_config(c)
        ema, opt = sm.copy.deepcopy(model), torch.optim.AdamW(model.parameters(), lr=c.lr)
        fwd = torch.compile(model) if compiled else model
        losses = [sm.teacher_iteration(j, fwd, model, ema, opt, data, c, cpu)[0].item() for j in range(2)]
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager_losses, eager_w), (comp_losses, comp_w) = runs
    assert eager_losses == pytest.approx(comp_losses, rel=1e-4)
    assert (eager_w - comp_w).abs().max() < 1e-4
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in sm.DiT.from_config(c).parameters()])
    assert (eager_w - init).abs().max() > 1e-3  # the two steps did move the weights


def test_smoke_teacher_checkpoint_feeds_sample_stage(tmp_path):
    out = str(tmp_path)
    sm.main(["--preset", "smoke", "--stage", "teacher", "--out_dir", out])
    ck = torch.load(os.path.join(out, "teacher.pt"), weights_only=False)
    assert ck["step"] == sm.PRESETS["smoke"]["teacher_steps"] and ck["config"]["hidden"] == 32
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert {r["res"] for r in rows} == {8, 16, 24, 32}  # every scale trained
    sm.main(["--preset", "smoke", "--stage", "sample", "--out_dir", out])
    assert os.path.getsize(os.path.join(out, "samples_teacher.png")) > 100


def test_resume_continues_exactly(tmp_path):
    # 6 steps in one go == 4 steps, then --resume to 6 (warm-up covers all steps, so lr ignores the total)
    args = ["--preset", "smoke", "--stage", "teacher", "--warmup", "10"]
    sm.main(args + ["--out_dir", str(tmp_path / "a")])
    sm.main(args + ["--out_dir", str(tmp_path / "b"), "--teacher_steps", "4"])
    sm.main(args + ["--out_dir", str(tmp_path / "b"), "--resume", "true"])
    a, b = (torch.load(tmp_path / d / "teacher.pt", weights_only=False) for d in "ab")
    assert b["step"] == 6
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-6, atol=1e-7)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "log.jsonl")]
    assert steps == list(range(6))


def test_short_teacher_run_lowers_denoising_error_against_exact():
    torch.manual_seed(0)
    c = sm.Config(res=16, scales=[8, 16], sigmas=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1,
                  batch=64, lr=2e-3, warmup=10, teacher_steps=120, out_dir="", log_every=1000, sample_every=0)
    toy = ToyTeacher(res=16)
    model = sm.DiT.from_config(c)
    before = sm.denoising_error(model.eval(), toy, 16, 0.5, 256, torch.device("cpu"))

    data = sm.Data(c, torch.device("cpu"))
    opt = torch.optim.AdamW(model.train().parameters(), lr=c.lr)
    for step in range(c.teacher_steps):
        x, y = data.batch(c.batch)
        x0 = sm.downsample(x, c.scales[step % 2])
        loss = sm.flow_matching_loss(model, x0, y, sm.logit_normal(c.batch, 0, 1, "cpu"), torch.randn_like(x0))
        opt.zero_grad(); loss.backward(); opt.step()
    after = sm.denoising_error(model.eval(), toy, 16, 0.5, 256, torch.device("cpu"))
    assert before[1] == after[1]  # same inputs, same Bayes error
    assert after[0] < 0.5 * before[0] and after[0] > after[1]  # learned a lot, still above the exact optimum
