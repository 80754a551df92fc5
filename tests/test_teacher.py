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
    c = sm.make_config(["--preset", "smoke", "--scales=16,32", "--levels", "1.0,0.5", "--lr=0.002", "--resume", "true"])
    assert c.scales == [16, 32] and c.levels == [1.0, 0.5] and c.lr == 0.002 and c.resume is True
    assert c.hidden == sm.PRESETS["smoke"]["hidden"] and c.out_dir == os.path.join("runs", "smoke")


def test_help_lists_every_field_with_its_default():
    text = run_cli("--help").stdout
    out = " ".join(text.split())  # undo line wrapping
    for f in sm.dataclasses.fields(sm.Config):
        assert f"--{f.name}" in out
    assert "(default: 8,16,24,32)" in out and "(default: 0.002)" in out
    # grouped by the config's own sections, in order, and ending with example commands
    heads = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")
             and line != "examples:"]
    assert heads[-8:] == ["run", "data", "model: a pixel-space DiT", "schedule (SwD section 3)",
                          "teacher: rectified flow at every scale", "distillation (SwD sections 4-6)",
                          "sampling", "logging and measuring"], heads
    assert "examples:" in text and "--stage sample --ckpt" in text
    # every help line is a complete sentence: each field's help ends with its default
    for name, comment in (f for _, fields in sm.config_sections() for f in fields):
        assert comment and comment.count("(") == comment.count(")"), name


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


def test_cifar10_converts_nhwc_and_missing_data_is_a_user_error(tmp_path, monkeypatch):
    import torchvision

    class Stub:  # what torchvision.datasets.CIFAR10 exposes: data (N, 32, 32, 3) uint8, targets list
        data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
        targets = [3, 9]

        def __init__(self, *a, **k):
            pass
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Stub)
    x, y = sm.load_cifar10(str(tmp_path))
    assert x.shape == (2, 3, 32, 32) and x[1, 2, 5, 7] == Stub.data[1, 5, 7, 2] and y.tolist() == [3, 9]

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(sm.UserError, match="cifar-10-batches-py"):
        sm.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_loader_decodes_resizes_and_caches(tmp_path, workers):
    from PIL import Image
    for k, cls in enumerate(("a", "b")):
        os.makedirs(tmp_path / "classes" / cls)
        for j in range(3):
            Image.fromarray(np.full((40, 50, 3), 100 * k + j, np.uint8)).save(tmp_path / "classes" / cls / f"{j}.png")
    c = sm.Config(data="folder", data_dir=str(tmp_path / "classes"), res=16, scales=[8, 16], levels=[1.0, 0.5],
                  num_classes=2, workers=workers)
    x, y = sm.load_dataset(c)
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert [int(v) for v in np.asarray(x)[:, 0, 8, 8]] == [0, 1, 2, 100, 101, 102]
    assert any(f.startswith(".swd_cache_16px_3ch") for f in os.listdir(tmp_path / "classes"))
    # a flat folder of images is one class: an unconditional model (--num_classes 1)
    os.makedirs(tmp_path / "flat")
    for j in range(2):
        Image.fromarray(np.full((20, 20), 7 * j, np.uint8)).save(tmp_path / "flat" / f"{j}.png")
    flat = sm.Config(data="folder", data_dir=str(tmp_path / "flat"), res=8, channels=1, scales=[8], levels=[1.0],
                     num_classes=1, workers=workers)
    x, y = sm.load_dataset(flat)
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 0] and int(np.asarray(x)[1].max()) == 7


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
    a = sm.DiT.pos_embedding_2d(2, 64, 8, "cpu").reshape(2, 2, 64)
    b = sm.DiT.pos_embedding_2d(6, 64, 8, "cpu").reshape(6, 6, 64)
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
        ema, opt = sm.copy.deepcopy(model), torch.optim.AdamW(model.parameters(), lr=c.lr, fused=True)
        fwd = torch.compile(model) if compiled else model
        losses = [sm.teacher_step(j, fwd, model, ema, opt, data, c, sm.Guard())[0].item() for j in range(2)]
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
    c = sm.Config(res=16, scales=[8, 16], levels=[1.0, 0.6], hidden=64, depth=2, heads=2, feat_block=1,
                  batch=64, lr=2e-3, warmup=10, teacher_steps=120, out_dir="", log_every=1000, sample_every=0)
    toy = ToyTeacher(res=16)
    model = sm.DiT.from_config(c)

    def x0_of(x_t, s, y):
        with torch.no_grad():
            return sm.to_x0(x_t, s, model(x_t, s, y))
    before = toy.denoising_error(x0_of, 16, 0.5)

    data = sm.Data(c, torch.device("cpu"))
    opt = torch.optim.AdamW(model.train().parameters(), lr=c.lr)
    for step in range(c.teacher_steps):
        x, y = data.batch(c.batch)
        x0 = sm.downsample(x, c.scales[step % 2])
        loss = sm.flow_matching_loss(model, x0, y, torch.sigmoid(torch.randn(c.batch)), torch.randn_like(x0))
        opt.zero_grad(); loss.backward(); opt.step()
    after = toy.denoising_error(x0_of, 16, 0.5)
    assert before[1] == after[1]  # same inputs, same Bayes error
    assert after[0] < 0.5 * before[0] and after[0] > after[1]  # learned a lot, still above the exact optimum
