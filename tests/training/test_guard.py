"""Tests for lorakit.training.guard: one run per output directory (a lock a crash does not leave stuck), a
read-only output refused before training, a full disk reported with the last checkpoint intact, SIGTERM."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli.main import main
from lorakit.training import evaluate, loop
from lorakit.training.checkpoint import checkpoint_problem, latest_checkpoint, resumable_checkpoint
from lorakit.training.guard import RunGuard, RunLocked, check_writable

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--eval-samples", "0", "--max-new-tokens", "1", "--precision", "fp32", "--warmup-steps", "1", "--quiet",
        "--batch-size", "2", "--r", "2", "--lr", "1e-2"]
HOLD_LOCK = "import sys, time; from pathlib import Path; from lorakit.training.guard import RunGuard\n" \
            "g = RunGuard(Path(sys.argv[1])).__enter__(); print('locked', flush=True); time.sleep(600)"


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), *FAST, *extra]


@pytest.fixture
def no_probes(monkeypatch):
    """The before/after evaluation without the forgetting and behaviour probes (most of a tiny run's time)."""
    original = evaluate.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: original(*a, **{**k, "probe": False, "behaviour": False}))


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def lock_held_by_another_process(out: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, env=env())
    try:
        assert proc.stdout.readline().strip() == b"locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_run_refused_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    with lock_held_by_another_process(out) as holder:
        # the model path does not exist: the lock must be refused before anything is loaded
        assert main(train_args(tmp_path / "no-model", tmp_path / "no-data", out)) == 1
        assert f"(pid {holder.pid}) is writing to {out}" in capsys.readouterr().err
        with pytest.raises(RunLocked):
            RunGuard(out).__enter__()
        holder.send_signal(signal.SIGKILL)  # a crash: nobody releases the lock by hand
        holder.wait()
    guard = RunGuard(out).__enter__()
    guard.__exit__()
    assert sorted(p.name for p in out.iterdir()) == [".lorakit.lock"]


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` at `directory` (root only); skips the test where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                      capture_output=True).returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_read_only_output_is_refused_before_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    with mounted_tmpfs(out, "1m", read_only=True) as mounted:
        if not mounted:  # without mount rights: the write fails as it would on a read-only filesystem
            def read_only(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system")
            monkeypatch.setattr("tempfile.mkstemp", read_only)
        assert main(train_args(tmp_path / "no-model", tmp_path / "no-data", out / "run")) == 1
    err = capsys.readouterr().err
    assert f"the output directory {out / 'run'} is not writable (Read-only file system)" in err
    assert "Nothing was trained" in err


def test_a_run_that_fails_before_writing_leaves_no_new_directory(tmp_path, capsys):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    for out in (fresh, existing):  # the model does not exist: lorakit's error after the lock was taken
        assert main(train_args(tmp_path / "no-model", tmp_path / "no-data", out)) == 1
        assert "no-model" in capsys.readouterr().err
    assert not fresh.exists()  # it created the directory and wrote nothing else, so it removed both
    assert sorted(p.name for p in existing.iterdir()) == [".lorakit.lock"]  # someone else's directory stays


def test_check_writable_creates_the_directory(tmp_path):
    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_good_one(tiny_model_dir, task_files, tmp_path, capsys,
                                                                      no_probes):
    train, _ = task_files
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_args(tiny_model_dir, train, full, "--max-steps", "4", "--save-every", "1")) == 0
    assert main(train_args(tiny_model_dir, train, part, "--max-steps", "4", "--save-every", "1")) == 0
    ckpts = part / "checkpoints"
    latest = latest_checkpoint(ckpts)
    assert latest.name == "step-00000003" and checkpoint_problem(latest) is None
    target = latest / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # one bit of one weight, after the file was written
    target.write_bytes(bytes(data))
    assert resumable_checkpoint(ckpts)[0].name == "step-00000002"

    import shutil

    shutil.rmtree(part / "adapter")
    capsys.readouterr()
    assert main(train_args(tiny_model_dir, train, part, "--max-steps", "4", "--save-every", "1", "--resume")) == 0
    said = capsys.readouterr().out
    assert f"checkpoint {latest} is corrupt: trainable.safetensors is changed" in said
    assert f"--resume: using {ckpts / 'step-00000002'} instead." in said
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_sigterm_writes_a_checkpoint_then_stops_cleanly(tiny_model_dir, task_files, tmp_path):
    train, _ = task_files
    out = tmp_path / "run"
    runner = ("import sys\nfrom lorakit.training import evaluate, loop\n"
              "loop.evaluate = lambda *a, **k: evaluate.evaluate(*a, **{**k, 'probe': False, 'behaviour': False})\n"
              "from lorakit.cli.main import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", runner, *train_args(tiny_model_dir, train, out, "--max-steps", "500")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "stopped by SIGTERM after step" in err
    step = int(err.split("after step ")[1].split(";")[0])
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == f"step-{step:08d}" and checkpoint_problem(ckpt) is None
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert 2 <= step < 500 and not (out / "adapter").exists()


def test_full_disk_during_training_then_resume_after_freeing_space(tiny_model_dir, task_files, tmp_path, capsys,
                                                                   no_probes, monkeypatch):
    """A real tmpfs (root), else ENOSPC injected at the third checkpoint's write."""
    train, _ = task_files
    args = ["--max-steps", "6", "--save-every", "1"]
    reference = tmp_path / "reference"
    assert main(train_args(tiny_model_dir, train, reference, *args)) == 0
    one = sum(p.stat().st_size for p in (reference / "checkpoints" / "step-00000005").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "8m") as mounted:
        out, filler = disk / "run", disk / "filler"
        if mounted:  # room for config, metrics and two and a half checkpoints
            st = os.statvfs(disk)
            filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - int(2.5 * one) - 64 * 1024))
        else:
            from lorakit.training import checkpoint

            real_save, calls = checkpoint.save_checkpoint, []

            def fill_at_third(directory, step, *rest, **kw):
                calls.append(step)
                if len(calls) == 3:
                    monkeypatch.setattr(checkpoint.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
                        OSError(errno.ENOSPC, "No space left on device", str(self))))
                return real_save(directory, step, *rest, **kw)
            monkeypatch.setattr(loop, "save_checkpoint", fill_at_third)
        capsys.readouterr()
        assert main(train_args(tiny_model_dir, train, out, *args)) == 1
        err = capsys.readouterr().err
        assert "no space left on the device while writing" in err and "Traceback" not in err
        ckpts = out / "checkpoints"
        latest = latest_checkpoint(ckpts)
        assert latest is not None and f"the last complete checkpoint {latest} is intact" in err
        assert checkpoint_problem(latest) is None and not list(ckpts.glob(".step-*"))
        assert not (out / "adapter").exists()
        if mounted:
            filler.unlink()
        else:
            monkeypatch.undo()
            original = evaluate.evaluate
            monkeypatch.setattr(loop, "evaluate", lambda *a, **k: original(*a, **{**k, "probe": False, "behaviour": False}))
        assert main(train_args(tiny_model_dir, train, out, *args, "--resume")) == 0
        a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
