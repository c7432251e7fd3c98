"""Kill `lorakit train --save-every 1` with SIGKILL at seeded random moments, `--resume` after each, and check
that the final adapter is bit-identical to an uninterrupted run.

    python benchmarks/kill_harness.py --kills 50 --seed 0

One training trajectory is killed `--kills` times: each attempt starts `lorakit train ... --resume` and is
SIGKILLed after a random delay drawn (seeded) from the span in which that run trains and writes its
checkpoints, so kills land in steps, inside checkpoint writes (a `.step-*.tmp` directory left behind
shows it), in the final save, or at start-up. After the last kill the run finishes with `--resume`; its
adapter must equal, bit for bit, the adapter of a run never interrupted. The tiny model (2 layers, 16 wide,
SmolLM2's tokenizer) keeps every run to seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def make_tiny_model(directory: Path) -> Path:
    """A 2-layer, 16-wide random Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    from lorakit.tools.bench_serve_http import tiny_model

    return Path(tiny_model(directory, hidden_size=16, heads=2, kv_heads=1, max_positions=128))


def make_data(path: Path, rows: int = 24) -> Path:
    """A small instruction dataset (the built-in task)."""
    from lorakit.training.tasks import builtin_task

    train, _ = builtin_task(n_train=rows, n_eval=2, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


# `lorakit train` through the CLI's own main, with the before/after report reduced to the held-out loss:
# the forgetting and behaviour probes (generation on a 49k-token vocabulary) would take ~90% of each run
# and are not part of what a checkpoint restores.
RUNNER = """import sys
from lorakit.training import evaluate, loop
loop.evaluate = lambda *a, **k: evaluate.evaluate(*a, **{**k, "probe": False, "behaviour": False})
from lorakit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def train_command(model: Path, data: Path, out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-c", RUNNER, "train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--save-every", "1", "--r", "2", "--lr", "1e-2",
            "--lora-dropout", "0.1", "--precision", "fp32", "--warmup-steps", "1", "--eval-samples", "0",
            "--max-new-tokens", "1", "--quiet", *(["--resume"] if resume else [])]


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int, float, str]:
    """Run `cmd`; SIGKILL its process group after `kill_after` seconds. Returns (exit code, seconds, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, time.perf_counter() - start, err.decode(errors="replace")


def run_until_writing(cmd: list[str], out: Path, extra_delay: float) -> tuple[int, bool]:
    """Run `cmd` and SIGKILL it `extra_delay` seconds after a checkpoint write is seen under way (its temporary
    directory exists). Returns (exit code, whether a write was caught)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    ckpts = out / "checkpoints"
    stale = set(ckpts.glob(".step-*"))  # left by an earlier kill: not this run's write
    while proc.poll() is None:
        if ckpts.is_dir() and set(ckpts.glob(".step-*")) - stale:
            time.sleep(extra_delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode, True
        time.sleep(0.001)
    return proc.returncode, False


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def mid_write_leftovers(out: Path) -> int:
    """Temporary directories/files a kill left inside a checkpoint or adapter write."""
    ckpts = out / "checkpoints"
    found = list(ckpts.glob(".step-*")) + list(ckpts.glob(".latest.*")) if ckpts.exists() else []
    return len(found + list(out.glob(".adapter.*")))


def kill_trials(kills: int, seed: int, steps: int, workdir: Path, in_write: int = 0) -> dict:
    """The harness: returns the counts it prints."""
    model, data = make_tiny_model(workdir / "model"), make_data(workdir / "train.jsonl")
    reference = workdir / "reference"
    code, full_s, err = run(train_command(model, data, reference, steps, resume=False))
    assert code == 0, err
    # A run's first `startup` seconds import and load; kills are spread over the rest, where it trains and saves.
    code, startup_s, err = run(train_command(model, data, workdir / "probe", 1, resume=False))
    assert code == 0, err
    rng = random.Random(seed)
    out = workdir / "killed"
    counts = {"kills": 0, "mid_write": 0, "in_write_targeted": 0, "finished": 0, "identical": 0}
    reference_tensors = adapter(reference)

    def finished_identical() -> None:  # a trajectory reached its end: compare it, then start another
        counts["finished"] += 1
        b = adapter(out)
        counts["identical"] += reference_tensors.keys() == b.keys() and all(
            torch.equal(reference_tensors[k], b[k]) for k in b)
        shutil.rmtree(out)

    while counts["kills"] < kills + in_write:
        if counts["kills"] >= kills:  # the targeted kills: inside a checkpoint write, seen by its temporary directory
            code, caught = run_until_writing(train_command(model, data, out, steps, resume=True), out,
                                             rng.uniform(0, 0.005))
            err, delay = "", 0.0
        else:
            delay = rng.uniform(startup_s * 0.9, full_s * 1.05)
            code, _, err = run(train_command(model, data, out, steps, resume=True), kill_after=delay)
        if code == 0:  # it finished before the kill
            finished_identical()
            continue
        assert code == -signal.SIGKILL, f"the run failed by itself (exit {code}):\n{err}"
        counts["kills"] += 1
        # a write was cut if its temporary directory is still there (the next run's save removes it)
        counts["in_write_targeted" if delay == 0.0 else "mid_write"] += mid_write_leftovers(out) > 0
        print(f"kill {counts['kills']}/{kills + in_write} after {delay:.1f} s: {counts}", file=sys.stderr, flush=True)
    code, _, err = run(train_command(model, data, out, steps, resume=True))
    assert code == 0, f"--resume after the last kill failed (exit {code}):\n{err}"
    finished_identical()
    counts.update(steps=steps, run_s=round(full_s, 1), seed=seed)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--in-write", type=int, default=0,
                        help="further kills, each fired the moment a checkpoint write is seen under way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorakit-kill-") as tmp:
        counts = kill_trials(args.kills, args.seed, args.steps, Path(tmp), args.in_write)
    print(json.dumps(counts))
    print(f"{counts['kills']} SIGKILLs ({counts['mid_write']} of the random ones and {counts['in_write_targeted']} targeted "
          "ones inside a checkpoint write), each followed by "
          f"--resume; {counts['identical']} of {counts['finished']} finished runs end at an adapter bit-identical to "
          "the uninterrupted run's")
    return 0 if counts["identical"] == counts["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
