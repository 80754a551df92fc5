"""Scale-out on this CPU: torchrun with 2 gloo ranks computes what one process computes on the same
global batch; checkpoints move between the two; the bf16 path runs; flips mirror and keep labels."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import swd_mini as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke"]


def run(args, ranks=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    r = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "swd_mini.py"), *SMOKE, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def max_difference(path_a, path_b, keys):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a["step"] == b["step"]
    return max((a[key][k] - b[key][k]).abs().max().item() for key in keys for k in a[key])


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same smoke teacher and 4-step distillation, on one process and on two ranks."""
    out = {n: str(tmp_path_factory.mktemp(f"ranks{n}")) for n in (1, 2)}
    for n, folder in out.items():
        run(["--stage", "teacher", "--out_dir", folder], ranks=n)
        run(["--stage", "distill", "--distill_steps", "4", "--out_dir", folder], ranks=n)
    # and two ranks, each splitting its half of every batch into two micro-batches (--accum 2)
    out["2x2"] = str(tmp_path_factory.mktemp("ranks2_accum2"))
    for stage in ("teacher", "distill"):
        run(["--stage", stage, "--distill_steps", "4", "--accum", "2", "--batch", "8", "--distill_batch", "4",
             "--out_dir", out["2x2"]], ranks=2)
    return out


def test_two_ranks_train_the_teacher_one_process_trains(one_and_two):
    a, b = (os.path.join(one_and_two[n], "teacher.pt") for n in (1, 2))
    assert max_difference(a, b, ["model", "ema"]) < 1e-5
    rows = [json.loads(line) for line in open(os.path.join(one_and_two[2], "log.jsonl"))]
    assert {r["world_size"] for r in rows if "world_size" in r} == {2}
    assert len([r for r in rows if r["stage"] == "teacher"]) == sm.PRESETS["smoke"]["teacher_steps"]  # rank 0 logs


def test_two_ranks_distil_what_one_process_distils(one_and_two):
    a, b = (os.path.join(one_and_two[n], "student.pt") for n in (1, 2))
    assert max_difference(a, b, ["gen", "fake", "head"]) < 1e-5
    ck = torch.load(b, weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["gen"])


def test_two_ranks_with_accumulation_train_what_one_process_trains_in_one_go(one_and_two):
    for name, keys in (("teacher.pt", ["model", "ema"]), ("student.pt", ["gen", "fake", "head"])):
        a, b = (os.path.join(one_and_two[n], name) for n in (1, "2x2"))
        assert max_difference(a, b, keys) < 1e-5, name


def test_checkpoints_move_between_one_process_and_two_ranks(tmp_path, one_and_two):
    for src, ranks in ((2, 1), (1, 2)):  # a 2-rank teacher resumed on one process, and the reverse
        out = str(tmp_path / f"from{src}")
        os.makedirs(out)
        with open(os.path.join(one_and_two[src], "teacher.pt"), "rb") as f:
            open(os.path.join(out, "teacher.pt"), "wb").write(f.read())
        run(["--stage", "teacher", "--teacher_steps", "8", "--resume", "true", "--out_dir", out], ranks=ranks)
        assert torch.load(os.path.join(out, "teacher.pt"), weights_only=True)["step"] == 8


def test_the_global_batch_must_split_over_the_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "swd_mini.py"), *SMOKE, "--batch", "7", "--out_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "divisible by the 2 ranks" in r.stderr


def test_bf16_path_on_the_cpu(tmp_path):
    out = str(tmp_path)
    bf16 = ["--precision", "bf16", "--out_dir", out]
    sm.main(SMOKE + ["--stage", "teacher"] + bf16)
    sm.main(SMOKE + ["--stage", "distill"] + bf16)
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = [v for r in rows for k, v in r.items() if k in ("loss", "dmd", "gan", "mmd", "fake", "disc")]
    assert losses and all(np.isfinite(losses))
    c = sm.make_config(SMOKE + bf16)
    gen, gen_c, _ = sm.model_from_checkpoint(os.path.join(out, "student.pt"), torch.device("cpu"), kind="student")
    y = torch.arange(4)
    seen = []
    gen.blocks[0].qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with sm.autocast(torch.device("cpu"), "bf16"):
        gen(torch.randn(4, 3, 8, 8), 1.0, y)
    assert seen == [torch.bfloat16]  # the matrix products do run in bf16
    x, traj = sm.student_sampler(gen, c, y, return_trajectory=True)
    assert x.dtype == torch.float32 and all(t.dtype == torch.float32 for t in traj)
    assert sm.teacher_sampler(gen, c, y, 2).dtype == torch.float32


def test_flip_mirrors_part_of_the_batch_and_keeps_labels(tmp_path):
    from PIL import Image
    for cls, value in (("a", 10), ("b", 200)):
        os.makedirs(tmp_path / cls)
        img = np.zeros((16, 16, 3), np.uint8)
        img[:, :8] = value  # left half bright: a mirror image has its right half bright
        Image.fromarray(img).save(tmp_path / cls / "0.png")
    c = sm.Config(data="folder", data_dir=str(tmp_path), res=16, scales=[8, 16], levels=[1.0, 0.5], num_classes=2)
    assert c.flip == "auto" and sm.Data(c, "cpu").flip  # on by default for folders
    x, y = sm.Data(c, "cpu").batch(64, torch.Generator().manual_seed(0))
    left = x[:, :, :, :8].mean((1, 2, 3)) > x[:, :, :, 8:].mean((1, 2, 3))
    assert 10 < int(left.sum()) < 54  # some mirrored, some not
    level = x[:, 0, 0].max(-1).values  # the bright value, wherever it is: 10 for class a, 200 for b
    assert torch.equal(level > 0, y == 1)
    off = dict(c.__dict__, flip="false")
    assert not sm.Data(sm.Config(**off), "cpu").flip and not sm.Data(sm.Config(), "cpu").flip  # not the toy world
