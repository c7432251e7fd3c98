"""Where the limit row of `lorakit bench train` goes: the lorakit step's recorded matrix products grouped by
(op, shapes, strides, dtype), each group replayed alone, with its share of the replay and its GFLOP/s; and the
same group with every operand made contiguous first (whether another memory layout of the same product would
be faster on this CPU).

    python benchmarks/limit_breakdown.py [--top 20]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import Counter

import torch

from lorakit.tools.bench import BenchTrainConfig, step_function
from lorakit.tools.roofline import GEMM_OPS, Gemm, capture_gemms, random_operands


def seconds(func, args: list[torch.Tensor], calls: int, repeats: int = 5) -> float:
    func(*args)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            func(*args)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def describe(call: Gemm) -> str:
    """e.g. "1024x576 @ 576x1536(T)": (T) marks an operand laid out transposed (column-major)."""
    def one(shape, stride) -> str:
        transposed = len(shape) >= 2 and stride[-2] == 1 and shape[-2] > 1 and stride[-1] > 1
        return "x".join(map(str, shape)) + ("(T)" if transposed else "")
    operands = call.args[1:] if call.op in ("addmm", "baddbmm") else call.args
    return " @ ".join(one(shape, stride) for shape, stride, _ in operands)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    # as the limit row captures them: the eager step after its warm-up
    step, _ = step_function("lorakit", dataclasses.replace(BenchTrainConfig(), compile="off"), device)
    step(), step()
    calls = capture_gemms(step)
    funcs = {name: op for op, name in GEMM_OPS.items()}
    groups = Counter(calls)
    rows = []
    for call, count in groups.items():
        operands = random_operands(call, device)
        rows.append((seconds(funcs[call.op], operands, count),
                     seconds(funcs[call.op], [t.contiguous() for t in operands], count), count, call))
    total = sum(r[0] for r in rows)
    gflop = sum(c.flops for c in calls) / 1e9
    print(f"{len(calls)} products, {gflop:.1f} GFLOP, replayed group by group in {total:.3f} s "
          f"({gflop / total:.0f} GFLOP/s overall)")
    print("| seconds | share | calls | op | dtype | shapes | GFLOP/s | operands contiguous (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for t, t_contiguous, count, call in sorted(rows, key=lambda r: -r[0])[:args.top]:
        dtype = str(call.args[-1][2]).removeprefix("torch.")
        print(f"| {t:.3f} | {100 * t / total:.1f}% | {count} | {call.op} | {dtype} | {describe(call)} | "
              f"{call.flops * count / t / 1e9:.0f} | {t_contiguous:.3f} |")


if __name__ == "__main__":
    main()
