"""Regional torch.compile of the decoder layers in `lorakit bench train`'s lorakit step (default model, this
machine's dtype), against the same step eager, each in its own process.

`layer.compile()` on every decoder layer; with `--unspec-int` dynamo treats int attributes of modules (the
layer index) as unspecialized, so one graph serves every layer instead of one recompile per layer, up to
dynamo's cache limit. Prints the first step (compile included), the median of 12 timed steps and the number
of graphs dynamo compiled.

    .venv/bin/python benchmarks/regional_compile.py              # eager, then compiled with --unspec-int
    .venv/bin/python benchmarks/regional_compile.py compile      # one mode: eager | compile | compile-unspec
"""
import statistics
import subprocess
import sys
import time

import torch

STEPS = 12

from lorakit.tools.bench import BenchTrainConfig, step_function


def measure(mode: str) -> None:
    step, model = step_function("lorakit", BenchTrainConfig(model=None, device="cpu"), torch.device("cpu"))
    if mode != "eager":
        import torch._dynamo.config as dynamo_config

        dynamo_config.allow_unspec_int_on_nn_module = mode == "compile-unspec"
        inner = getattr(model, "model", None) or model.base_model.model.model
        for layer in inner.layers:
            layer.compile()
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
        for mode in ("eager", "compile-unspec"):
            subprocess.run([sys.executable, __file__, mode], check=True)
