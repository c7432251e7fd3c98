"""The bf16 products of one decoding step (or prefill) of the default model, by row count, in each layout the
serving engine can hold its weights in: oneDNN's packed copy, lorakit's gemv kernel on the rows, lorakit's tiled
kernel, and F.linear; kinds interleaved in rounds so a shared machine's drift hits them alike. Random weights of
the model's shapes (30 layers of q/k/v, o, gate/up, down, then the head), so they stream from memory as a step's
do.

    PYTHONPATH=src python benchmarks/bf16_products.py                          # 1, 2, 4, 8, 12, 16 rows
    PYTHONPATH=src python benchmarks/bf16_products.py --rows 16 64 256 2048 --no-head --kinds packed linear tiles

Prints per row count the milliseconds for all products (median of the rounds) and, against the packed copy,
each kind's speed-up; with the GB/s the weights streamed at and the GFLOP/s of the products.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lorakit.serve.lora_kernel import gemv_kernel, tiles_kernel

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q/k/v, o, gate/up, down of SmolLM2-135M
HEAD = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    parser.add_argument("--kinds", nargs="+", default=["packed", "gemv", "tiles"],
                        choices=["packed", "gemv", "tiles", "linear"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-head", action="store_true", help="the layers' products only (as a prefill's)")
    args = parser.parse_args()
    if ({"gemv", "tiles"} & set(args.kinds)) and (gemv_kernel() is None or tiles_kernel() is None):
        raise SystemExit("the compiled kernels need AVX-512 BF16 and a C++ compiler: run --kinds packed linear")
    torch.manual_seed(0)
    shapes = LAYER * 30 + ([] if args.no_head else [HEAD])
    rows_of = [(torch.randn(o, i) * 0.02).bfloat16() for o, i in shapes]
    held = {
        "packed": [torch.ops.mkldnn._reorder_linear_weight(w) for w in rows_of] if "packed" in args.kinds else [],
        "tiles": [tiles_kernel()[1](w) for w in rows_of] if "tiles" in args.kinds else [],
    }
    weight_bytes = sum(w.numel() * 2 for w in rows_of)
    for n in args.rows:
        xs = {i: torch.randn(n, i).bfloat16() for i in (576, 1536)}
        outs = [torch.empty(n, o, dtype=torch.bfloat16) for o, _ in shapes]

        def run(kind: str) -> None:
            for k, (o, i) in enumerate(shapes):
                if kind == "packed":
                    torch.ops.mkldnn._linear_pointwise(xs[i], held["packed"][k], None, "none", [], "")
                elif kind == "linear":
                    F.linear(xs[i], rows_of[k])
                elif kind == "gemv" and n <= 16:
                    gemv_kernel()(xs[i], rows_of[k], outs[k])
                elif kind == "tiles":
                    tiles_kernel()[0](xs[i], held["tiles"][k], outs[k])

        kinds = [k for k in args.kinds if k != "gemv" or n <= 16]  # gemv takes at most 16 rows
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for kind in kinds:
            run(kind)  # warm-up
        for _ in range(args.rounds):
            for kind in kinds:
                start = time.perf_counter()
                run(kind)
                times[kind].append(time.perf_counter() - start)
        median = {kind: statistics.median(values) for kind, values in times.items()}
        reference = median.get("packed", next(iter(median.values())))
        flops = sum(2 * n * o * i for o, i in shapes)
        print(f"{n:5d} rows: " + "  ".join(
            f"{kind} {t * 1e3:7.2f} ms ({reference / t:4.2f}x, {weight_bytes / t / 1e9:4.1f} GB/s, {flops / t / 1e9:5.0f} GFLOP/s)"
            for kind, t in median.items()), flush=True)


if __name__ == "__main__":
    main()
