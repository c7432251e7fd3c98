"""Regional torch.compile of the decoder layers in `lorakit bench train`'s lorakit step (default model, this
machine's dtype), against the same step eager, each in its own process.

The compiled mode is the shipped path, `lorakit train --compile on` (`lorakit.training.compiled_layers`: one
graph for every layer, the layer index unspecialized). Prints the first step (compile included), the median
of 12 timed steps and the number of graphs dynamo compiled.

    .venv/bin/python benchmarks/regional_compile.py              # eager, then compiled
    .venv/bin/python benchmarks/regional_compile.py compiled     # one mode: eager | compiled
"""
import statistics
import subprocess
import sys
import time

import torch

from lorakit.tools.bench import BenchTrainConfig, step_function

STEPS = 12


def measure(mode: str) -> None:
    # the shipped path: `lorakit train --compile on|off` (lorakit.training.compiled_layers)
    cfg = BenchTrainConfig(model=None, device="cpu", compile="off" if mode == "eager" else "on")
    step, model = step_function("lorakit", cfg, torch.device("cpu"))
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    print(f"{mode}: first step {first:.1f} s, median step {statistics.median(times):.3f} s "
          f"({', '.join(f'{t:.2f}' for t in times)}), dynamo graphs compiled {graphs}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        for mode in ("eager", "compiled"):
            subprocess.run([sys.executable, __file__, mode], check=True)
