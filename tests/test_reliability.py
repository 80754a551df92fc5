"""Never lose a run, never run a stranger's code: safe loading, kill -9 and resume bit for bit, the
numerical guard, every bad input as one line with exit 2, determinism."""
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import swd_mini as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A folder with a good smoke teacher.pt and student.pt."""
    out = str(tmp_path_factory.mktemp("good"))
    sm.main(SMOKE + ["--stage", "teacher", "--out_dir", out])
    sm.main(SMOKE + ["--stage", "distill", "--out_dir", out])
    return out


def tensors(checkpoint):
    """Every tensor of a checkpoint, by a flat key (state dicts, optimiser states, RNG)."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                walk(f"{prefix}/{k}", v)
    walk("", {k: v for k, v in checkpoint.items() if k != "config"})
    return flat


def assert_bitwise_equal(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a["step"] == b["step"]
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ------------------------------------------------------------------ kill -9, then resume
def launch(out, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "swd_mini.py"), *SMOKE, "--out_dir", out,
                             "--ckpt_every", "1", "--log_every", "1", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logged_steps(out, stage):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return -1
    rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
    return max([r["step"] for r in rows if r["stage"] == stage], default=-1)


def kill_at_a_random_step(out, stage, args, last):
    """Start a run, SIGKILL it once it has logged a random step, resume it to the end."""
    kill_after = random.Random(os.getpid()).randint(2, last - 4)
    proc = launch(out, *args)
    deadline = time.time() + 120
    while logged_steps(out, stage) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert logged_steps(out, stage) < last, "the run finished before it could be killed"
    resumed = launch(out, *args, "--resume", "true")
    assert resumed.wait(timeout=300) == 0
    return kill_after


@pytest.mark.parametrize("stage,steps", [("teacher", "--teacher_steps"), ("distill", "--distill_steps")])
def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, good, stage, steps):
    args = ["--stage", stage, steps, "30"]
    if stage == "distill":
        args += ["--teacher", os.path.join(good, "teacher.pt")]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert launch(whole, *args).wait(timeout=300) == 0
    kill_at_a_random_step(killed, stage, args, 30)
    name = "teacher.pt" if stage == "teacher" else "student.pt"
    assert_bitwise_equal(os.path.join(whole, name), os.path.join(killed, name))


def test_sigterm_saves_at_the_next_step_and_says_how_to_resume(tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "swd_mini.py"), *SMOKE, "--out_dir", out,
                             "--stage", "teacher", "--teacher_steps", "100000", "--log_every", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while logged_steps(out, "teacher") < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "--resume true" in err and "Traceback" not in err
    step = torch.load(os.path.join(out, "teacher.pt"), weights_only=True)["step"]
    assert 3 <= step <= logged_steps(out, "teacher") + 1


# ------------------------------------------------------------------ the numerical guard
@pytest.mark.parametrize("stage,target", [("teacher", "flow_matching_loss"), ("distill", "dmd_loss")])
def test_a_nan_stops_the_run_and_leaves_the_last_checkpoint(tmp_path, good, monkeypatch, capsys, stage, target):
    out = str(tmp_path)
    shutil.copy(os.path.join(good, "teacher.pt"), out)
    original, calls = getattr(sm, target), []

    def poisoned(*a, **k):  # finite for 5 calls, then NaN
        calls.append(1)
        loss = original(*a, **k)
        return loss * float("nan") if len(calls) > 5 else loss
    monkeypatch.setattr(sm, target, poisoned)
    name = "teacher.pt" if stage == "teacher" else "student.pt"
    with pytest.raises(SystemExit) as stop:
        sm.main(SMOKE + ["--stage", stage, "--out_dir", out, "--ckpt_every", "2", "--teacher_steps", "20",
                         "--distill_steps", "20"])
    assert stop.value.code == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "step 5" in err[0] and "nan" in err[0]
    ck = torch.load(os.path.join(out, name), weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(t).all() for t in tensors(ck).values())
    assert not os.path.exists(os.path.join(out, name + ".tmp"))


# ------------------------------------------------------------------ determinism
def test_two_runs_with_one_seed_are_bitwise_equal_and_sample_the_same_grid(tmp_path, good):
    for d in "ab":
        sm.main(SMOKE + ["--stage", "teacher", "--out_dir", str(tmp_path / d)])
    assert_bitwise_equal(tmp_path / "a" / "teacher.pt", tmp_path / "b" / "teacher.pt")
    grids = []
    for _ in range(2):
        sm.main(SMOKE + ["--stage", "sample", "--out_dir", good])
        grids.append(open(os.path.join(good, "samples_student.png"), "rb").read())
    assert grids[0] == grids[1]


# ------------------------------------------------------------------ bad input: one line, exit 2
class Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_idx(path, header_ints, payload):
    with gzip.open(path, "wb") as f:
        f.write(b"".join(v.to_bytes(4, "big") for v in header_ints) + payload)


def make_files(case_dir, good):
    """The bad files the table points at, in the case's folder."""
    j = lambda *p: os.path.join(case_dir, *p)  # noqa: E731
    open(j("a_file"), "w").write("not a folder")
    os.makedirs(j("empty"))
    os.makedirs(j("folder", "cls"))  # a class folder without images
    os.makedirs(j("fm_shape"))
    write_idx(j("fm_shape", "train-images-idx3-ubyte.gz"), [2051, 4, 28, 28], bytes(100))
    write_idx(j("fm_shape", "train-labels-idx1-ubyte.gz"), [2049, 4], bytes(4))
    os.makedirs(j("fm_labels"))
    write_idx(j("fm_labels", "train-images-idx3-ubyte.gz"), [2051, 2, 28, 28], bytes(2 * 784))
    write_idx(j("fm_labels", "train-labels-idx1-ubyte.gz"), [2049, 2], bytes([3, 12]))
    os.makedirs(j("in64"))
    np.savez(j("in64", "train_data_batch_1.npz"), data=np.zeros((2, 100), np.uint8), labels=[1, 2])
    blob = open(os.path.join(good, "teacher.pt"), "rb").read()
    open(j("truncated.pt"), "wb").write(blob[:len(blob) // 2])
    open(j("text.pt"), "w").write("hello")
    torch.save({"weights": torch.zeros(3)}, j("foreign.pt"))
    torch.save({"kind": "teacher", "payload": Pwn(j("pwned"))}, j("evil.pt"))
    old = torch.load(os.path.join(good, "student.pt"), weights_only=True)
    old.pop("format")
    os.makedirs(j("old"))
    torch.save(old, j("old", "student.pt"))
    os.makedirs(j("npz"))
    np.savez(j("npz", "samples.npz"), arr_0=np.zeros((5, 32, 32, 3), np.uint8), labels=np.zeros(5))
    os.makedirs(j("stale"))  # --reg_weight pairs drawn by another run
    torch.save(dict(z=torch.zeros(2), y=torch.zeros(2), x=torch.zeros(2), key=dict(n=2)), j("stale", "ode_pairs.pt"))
    os.makedirs(j("swapped"))
    shutil.copy(os.path.join(good, "teacher.pt"), j("swapped", "student.pt"))


T, D = ["--stage", "teacher"], ["--stage", "distill"]
CASES = [  # (arguments, with {d} the case folder and {g} the good folder; what the one line must say)
    (["--preset", "nope"], "unknown preset"),
    (["--no_such_key", "1"], "unrecognized arguments"),
    (["--lr", "fast"], "invalid"),
    (["--lr", "nan"], "finite"),
    (["--resume", "maybe"], "true or false"),
    (["--stage", "train"], "--stage"),
    (["--data", "imagenet"], "--data"),
    (["--scales", "8,16,24"], "end at --res"),
    (["--levels", "1.0,0.5,0.7,0.2"], "never rising"),
    (["--patch", "5"], "divisible by --patch"),
    (["--hidden", "30"], "multiple of 4"),
    (["--feat_block", "9"], "--feat_block"),
    (["--ema", "1.5"], "--ema"),
    (["--dmd_levels", "0.5,0.2"], "--dmd_levels"),
    (["--ckpt_every", "-1"], "--ckpt_every"),
    (["--precision", "fp16"], "--precision"),
    (["--flip", "maybe"], "--flip"),
    (["--eval_ref", "-1"], "--eval_ref"),
    (["--bench_repeats", "-1"], "--bench_repeats"),
    (["--eval_every", "-5"], "--eval_every"),
    (["--fake_loss", "l1"], "--fake_loss"),
    (["--fake_lr", "-1e-4"], "--fake_lr"),
    (["--accum", "3"], "--accum 3 must divide"),
    (["--labels", "7"], "--labels"),
    (["--n", "0"], "--n must be at least 1"),
    (["--inputs", "noise"], "--inputs"),
    (["--teacher", "toy", "--data", "fmnist"], "needs --data toy"),
    (["--teacher_target", "exact", "--data", "fmnist"], "needs --data toy"),
    (T + ["--out_dir", "{d}/a_file"], "is a file"),
    (T + ["--out_dir", "/proc/swd_mini_cannot_be_here"], "cannot be created"),
    (T + ["--data", "imagenet64", "--data_dir", "{d}/empty", "--res", "64", "--scales", "16,32,48,64"],
     "no train_data_batch"),
    (T + ["--data", "imagenet64", "--data_dir", "{d}/in64", "--res", "64", "--scales", "16,32,48,64"],
     "12288"),
    (T + ["--data", "fmnist", "--data_dir", "{d}/fm_shape", "--channels", "1", "--num_classes", "10"],
     "pixel bytes"),
    (T + ["--data", "fmnist", "--data_dir", "{d}/fm_labels", "--channels", "1", "--num_classes", "10"],
     "labels"),
    (T + ["--data", "folder", "--data_dir", "{d}/folder"], "no images"),
    (T + ["--data", "folder", "--data_dir", "{d}/nowhere"], "--data_dir"),
    (D + ["--teacher", "{d}/missing.pt"], "no teacher"),
    (D + ["--out_dir", "{d}/empty"], "--stage teacher"),
    (D + ["--teacher", "{d}/truncated.pt"], "not a readable checkpoint"),
    (D + ["--teacher", "{d}/text.pt"], "not a readable checkpoint"),
    (D + ["--teacher", "{d}/foreign.pt"], "not a checkpoint of swd_mini"),
    (D + ["--teacher", "{d}/evil.pt"], "refused"),
    (D + ["--teacher", "{g}/student.pt"], "is a student checkpoint"),
    (["--stage", "sample", "--out_dir", "{d}/swapped"], "is a teacher checkpoint"),
    (["--stage", "sample", "--out_dir", "{d}/old"], "another version"),
    (D + ["--teacher", "{g}/teacher.pt", "--res", "16", "--scales", "8,16", "--levels", "1,0.5"], "res=32"),
    (D + ["--teacher", "{g}/teacher.pt", "--patch", "8", "--scales", "16,32", "--levels", "1,0.5"],
     "patch=4"),
    (D + ["--teacher", "{g}/teacher.pt", "--channels", "1"], "channels=3"),
    (D + ["--teacher", "{g}/teacher.pt", "--num_classes", "3"], "num_classes=4"),
    (["--num_classes", "5"], "1 to 4 classes"),
    (D + ["--teacher", "{g}/teacher.pt", "--hidden", "64"], "hidden=32"),
    (["--stage", "sample", "--ckpt", "{d}/missing.pt"], "no teacher or student checkpoint"),
    (["--stage", "sample", "--ckpt", "{d}/evil.pt"], "refused"),
    (["--stage", "sample", "--ckpt", "{d}/foreign.pt"], "not a checkpoint of swd_mini"),
    (["--stage", "sample", "--ckpt", "{g}/student.pt", "--n", "300", "--out_dir", "{d}/npz"], "holds images (5, 32, 32, 3)"),
    (T + ["--data", "folder", "--data_dir", "{d}/empty"], "no images"),
    (D + ["--teacher", "{g}/teacher.pt", "--out_dir", "{d}/stale", "--reg_weight", "1"], "was drawn for another run"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[f"{k:02d}" for k in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(tmp_path, good, capsys, args, needle):
    case = str(tmp_path)
    make_files(case, good)
    for name in ("teacher.pt", "student.pt"):
        shutil.copy(os.path.join(good, name), case)
    before = {name: open(os.path.join(case, name), "rb").read() for name in ("teacher.pt", "student.pt")}
    args = [a.format(d=case, g=good) for a in args]
    if "--out_dir" not in args:
        args += ["--out_dir", case]
    with pytest.raises(SystemExit) as stop:
        sm.main(SMOKE + args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not os.path.exists(os.path.join(case, "pwned"))
    for name, data in before.items():
        assert open(os.path.join(case, name), "rb").read() == data, name


def test_the_table_holds_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_a_bad_flag_through_the_real_command_line_is_one_line_exit_2():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "swd_mini.py"), "--lr", "fast"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
