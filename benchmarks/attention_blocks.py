"""lorakit's CPU attention with its queries in blocks (QUERY_BLOCK, each block over the keys up to its last query)
against one block of all queries (the form before the blocks), side by side in one process, rounds alternated.

    python benchmarks/attention_blocks.py attention            # forward + backward of one layer's attention
    python benchmarks/attention_blocks.py step --compile off   # the `lorakit bench train` step of the default model
    python benchmarks/attention_blocks.py step --compile on --seq-len 480

Prints the median milliseconds (attention) or seconds (step) of each form and their ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn

from lorakit.training import attention

BLOCKS = attention.QUERY_BLOCK  # lorakit's block size
ONE_BLOCK = 1 << 30  # every query in one block: the form before the blocks


def alternate(runs: dict[int, callable], rounds: int) -> dict[int, list[float]]:
    """Seconds of each run per round; the order flips every round so drift hits both alike."""
    times = {block: [] for block in runs}
    for block, run in runs.items():  # warm-up: kernels picked, pages faulted in, graphs compiled
        attention.QUERY_BLOCK = block
        run(), run()
    attention.QUERY_BLOCK = BLOCKS
    for i in range(rounds):
        for block in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            attention.QUERY_BLOCK = block
            start = time.perf_counter()
            runs[block]()
            times[block].append(time.perf_counter() - start)
    attention.QUERY_BLOCK = BLOCKS
    return times


def attention_alone(rounds: int) -> None:
    heads, kv_heads, dim, dtype = 9, 3, 64, torch.bfloat16  # SmolLM2-135M's attention
    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, heads // kv_heads, True
    print("batch x tokens | blocks of", BLOCKS, "(ms) | one block (ms) | one block / blocks")
    for batch, seq in [(4, 128), (4, 256), (4, 480), (8, 256)]:
        # as a Llama layer makes them: (B, T, H, D) transposed to (B, H, T, D)
        q, k, v = (torch.randn(batch, seq, h, dim).to(dtype).transpose(1, 2).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        grad = torch.randn(batch, seq, heads, dim).to(dtype)

        def run(repeats: int = 10) -> None:
            for _ in range(repeats):
                out, _ = attention.cpu_attention_forward(module, q, k, v, None, scaling=dim ** -0.5)
                out.backward(grad)
                q.grad = k.grad = v.grad = None

        times = alternate({BLOCKS: run, ONE_BLOCK: run}, rounds)
        blocks, one = (statistics.median(times[b]) * 100 for b in (BLOCKS, ONE_BLOCK))
        print(f"{batch} x {seq} | {blocks:.2f} | {one:.2f} | {one / blocks:.2f}x")


def training_step(rounds: int, compile_mode: str, seq_len: int) -> None:
    from lorakit.tools.bench import BenchTrainConfig, step_function

    torch.manual_seed(0)
    cfg = dataclasses.replace(BenchTrainConfig(), compile=compile_mode, seq_len=seq_len)
    step, _ = step_function("lorakit", cfg, torch.device("cpu"))
    times = alternate({BLOCKS: step, ONE_BLOCK: step}, rounds)
    blocks, one = (statistics.median(times[b]) for b in (BLOCKS, ONE_BLOCK))
    print(f"lorakit step, 4 x {seq_len}, --compile {compile_mode}: blocks of {BLOCKS} {blocks:.3f} s, "
          f"one block {one:.3f} s, one block / blocks {one / blocks:.3f}x ({rounds} steps each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["attention", "step"])
    parser.add_argument("--compile", default="off", choices=["off", "on"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    if args.what == "attention":
        attention_alone(args.rounds or 5)
    else:
        training_step(args.rounds or 12, args.compile, args.seq_len)


if __name__ == "__main__":
    main()
