"""Per-process memory of LoRA training on the default model (SmolLM2-135M, fp32 on this CPU): one process
(no sharding) against two processes with --shard fsdp, next to `lorakit plan`'s estimates.

    python benchmarks/fsdp_memory.py            # launches both runs (about 5 minutes on 2 shared cores)

Each training process loads, shards and trains (the before/after evaluations of `lorakit train` are
left out) and reports from /proc/self/status: VmHWM (its peak resident set) and VmRSS after
training (steady state), and from its local shards the bytes of the base it holds (sharding.json).
Run twice: with glibc's default allocator settings, and with MALLOC_MMAP_THRESHOLD_=131072 (tensors above
128 KB get their own mapping, returned to the OS when freed). By default glibc raises that threshold as
large blocks are freed and then keeps freed tensors in its heap, so the resident set grows by hundreds of MB
over a few steps without any live tensor behind it (malloc_trim(0) after 2 steps of the sharded run: 1.9 GB
-> 0.73 GB per process). Sharded CPU runs now set the threshold themselves (`sharding.bound_cpu_heap`), so
the "glibc default" rows show the fsdp run as lorakit runs it and the 1-process run with glibc's default.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = ["--max-steps", "2", "--batch-size", "2", "--max-seq-len", "128", "--eval-samples", "0",
        "--precision", "fp32", "--quiet", "--task-size", "64"]


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(argv: list[str]) -> None:
    """Load, shard (with --shard fsdp) and train a few steps; the before/after evaluations are left out,
    they measure the model rather than training."""
    import time

    from lorakit.cli.args import parse_config
    from lorakit.training.config import TrainConfig
    from lorakit.training.distributed import close_world, init_world
    from lorakit.training.loop import build_trainer, setup_run, train_step

    cfg = parse_config(TrainConfig, argv, prog="lorakit train")
    world = init_world(cfg.device)
    run = setup_run(cfg, world, time.perf_counter())
    trainer = build_trainer(run)
    run.model.train()
    for step in range(trainer.total_steps):
        train_step(run, trainer, step)
    print(json.dumps({"rank": world.rank, "peak_mb": status_mb("VmHWM"), "end_mb": status_mb("VmRSS")}), flush=True)
    close_world(world)


def launch(cmd: list[str], allocator: dict) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **allocator}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]


def plan_mb(nproc: int) -> float:
    from lorakit.tools.plan import plan

    result = plan("default", r=8, batch_size=2, seq_len=128, dtype="fp32", device="cpu",
                  nproc=nproc if nproc > 1 else 0)
    if nproc == 1:
        return {m.method: m.memory for m in result.methods}["lora"]["total"] / 1e6
    return result.shard["lora"]["parts"]["total"] / 1e6


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    here = str(Path(__file__).resolve())
    print("| allocator | run | per process: peak RSS | RSS after training | base held | plan's estimate |")
    print("|---|---|---|---|---|---|")
    for label, allocator in (("glibc default", {}), ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        with tempfile.TemporaryDirectory() as tmp:
            single = launch([sys.executable, here, "--worker", "--output", f"{tmp}/one", *ARGS], allocator)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torchrun = str(Path(sys.executable).with_name("torchrun"))
            sharded = launch([torchrun, "--nproc-per-node=2", f"--master-port={port}", here, "--worker",
                              "--output", f"{tmp}/fsdp", "--shard", "fsdp", *ARGS], allocator)
            held = json.loads(Path(f"{tmp}/fsdp/sharding.json").read_text())
        base = held["base_bytes"] / 1e6
        for run, rows, n, share in (("1 process", single, 1, base),
                                    ("2 processes, --shard fsdp", sharded, 2, held["base_bytes_per_rank"][0] / 1e6)):
            peak = max(r["peak_mb"] for r in rows)
            end = max(r["end_mb"] for r in rows)
            print(f"| {label} | {run} | {peak:.0f} MB | {end:.0f} MB | {share:.0f} MB | {plan_mb(n):.0f} MB |",
                  flush=True)


if __name__ == "__main__":
    main()
