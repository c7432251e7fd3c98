"""fp32 batch-1 products on the default model's shapes (30 layers + the head), four kernels: which one
reaches the memory bandwidth? Also F.linear at batch 1 on 1 vs 2 threads.

    .venv/bin/python benchmarks/gemv_kernels.py
"""
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, n=15):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    weights = [torch.randn(o, i) for o, i in shapes]  # (d_out, d_in), as nn.Linear holds them
    transposed = [w.t().contiguous() for w in weights]  # (d_in, d_out), as the engine holds them
    xs = {i: torch.randn(1, i) for i in (576, 1536)}
    nbytes = sum(w.numel() * 4 for w in weights)
    kernels = {
        "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
        "torch.mv": lambda: [torch.mv(w, xs[w.shape[1]][0]) for w in weights],
        "x @ Wt (d_in, d_out)": lambda: [xs[w.shape[0]] @ w for w in transposed],
        "mul+sum": lambda: [(w * xs[w.shape[1]]).sum(1) for w in weights],
    }
    for name, fn in kernels.items():
        ms = median_ms(fn)
        print(f"{name:24s} {ms:6.1f} ms  {nbytes / ms / 1e6:5.1f} GB/s")
    x = torch.randn(1, 576)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = median_ms(lambda: [F.linear(x, weights[2]) for _ in range(30)])
        print(f"threads {threads}: F.linear 3072x576 x30: {ms:.2f} ms")


if __name__ == "__main__":
    main()
