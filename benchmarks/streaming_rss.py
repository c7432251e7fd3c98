"""Peak memory of `lorakit train --streaming` on a 20 MB and a 2 GB JSON Lines file (the same command, a tiny
model): streaming keeps memory bounded, so both peaks should agree within 10%.

    .venv/bin/python benchmarks/streaming_rss.py [--dir /tmp/lorakit-rss] [--big-mb 2048] [--steps 20]

Writes the two files (text rows of ~500 bytes), a tiny 2-layer Llama with the default model's tokenizer,
runs each training in a fresh process under /usr/bin/time -v, then a full pass of lorakit's streaming reader
over each file (every row read and validated), and prints the peak RSS of each; the files are deleted after.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

WORDS = ("the model reads long documents one row at a time and keeps only a small buffer of them in memory "
         "while it trains on packed blocks of tokens drawn from anywhere in the file").split()


def write_jsonl(path: Path, megabytes: int) -> int:
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(80))}) + "\n" for _ in range(4096)]
    target, written, rows = megabytes << 20, 0, 0
    with path.open("w") as f:
        while written < target:
            line = lines[rows % len(lines)]
            f.write(line)
            written += len(line)
            rows += 1
    return rows


def tiny_model(directory: Path) -> None:
    from lorakit.tools.bench_serve_http import tiny_model as build

    build(directory)


def peak_rss_mb(command: list[str]) -> float:
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024


READ_ALL = """
import sys
from lorakit.training.data.sources import DataOptions, resolve
from lorakit.training.data.stream import RowStream
stream = RowStream(resolve(sys.argv[1], "train"), DataOptions(), None, seed=0, shuffle_buffer=1000)
print(sum(1 for _ in stream.records(0)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lorakit-rss")
    parser.add_argument("--big-mb", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        tiny_model(work / "model")
        files = {"20 MB": work / "small.jsonl", f"{args.big_mb / 1024:g} GB": work / "big.jsonl"}
        for (name, path), mb in zip(files.items(), (20, args.big_mb)):
            print(f"{name}: {write_jsonl(path, mb):,} rows, {path.stat().st_size / 2**20:,.0f} MiB", flush=True)
        lorakit = [sys.executable, "-m", "lorakit", "train", "--model", str(work / "model"), "--streaming",
                   "--packing", "--max-seq-len", "256", "--max-steps", str(args.steps), "--batch-size", "4",
                   "--eval-samples", "8", "--precision", "fp32", "--quiet"]
        for name, path in files.items():
            train = peak_rss_mb([*lorakit, "--data", str(path), "--output", str(work / f"run-{path.stem}")])
            read = peak_rss_mb([sys.executable, "-c", READ_ALL, str(path)])
            print(f"{name}: train peak RSS {train:.0f} MiB; full streaming pass peak RSS {read:.0f} MiB", flush=True)
        print("command:", " ".join([*lorakit, "--data", "FILE", "--output", "DIR"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
