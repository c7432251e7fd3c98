"""`lorakit bench serve`: many adapters, one base: throughput and latency of the serving engine beside what a
server would otherwise do, on a fixed, seeded workload; and batch-1 decoding against its limits.

Each configuration runs in a fresh process (its peak memory is its own):
    base       the workload's requests on the base model alone (the ceiling)
    mixed      lorakit's engine, each request on its own adapter, all batched together (mixed:N: N adapters)
    swap       the same clients, served as a server without mixed batches must: only one adapter's requests
               run at a time (the oldest waiting request's); the others wait until that batch has drained
    swap-grouped   the whole workload known in advance and served one adapter's group after another (a batch
               job's best case, not a server's: no online server sees its future requests)
    peft       PEFT's mixed-batch generate(..., adapter_names=[...]) in static batches of the same size
    decode-base, decode-unmerged, decode-merged   batch-1 decoding in the engine: base, one unmerged adapter,
               the adapter merged into the weights; decode-generate: transformers' generate on the base
    bandwidth  the batch-1 limit: bytes of weights read per token / the measured memory bandwidth
    llama.cpp  llama.cpp's single-stream decoding (llama-cpp-python) of the model's GGUF file
    agreement  greedy tokens of a mixed batch vs each request alone with model.generate (the serving dtype)

Clients keep `concurrency` requests in flight (closed loop): a finished request is replaced by the next.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from lorakit.core.errors import LorakitError
from lorakit.tools.bench import run_in_subprocess
from lorakit.tools.serve_workload import CONFIGS, BenchServeConfig


def run_config(name: str, cfg: BenchServeConfig) -> dict:
    """Run configuration `name` in this process; returns its measurements (or {"skipped": reason})."""
    from lorakit.tools import bench_serve_runs as runs
    from lorakit.tools.bench_serve_http import run_http
    from lorakit.training.models import as_device, default_device

    device = as_device(cfg.device) if cfg.device else default_device()
    torch.manual_seed(cfg.seed)
    kind, _, count = name.partition(":")
    table = {"base": runs.run_engine, "mixed": runs.run_engine, "swap": runs.run_engine,
             "swap-grouped": runs.run_engine, "peft": runs.run_peft,
             "decode-base": runs.run_decode, "decode-unmerged": runs.run_decode, "decode-merged": runs.run_decode,
             "decode-generate": runs.run_generate_decode, "bandwidth": runs.run_bandwidth,
             "llama.cpp": runs.run_llama_cpp, "agreement": runs.run_agreement, "http": run_http}
    if kind not in table:
        raise LorakitError(f"unknown bench serve configuration {name!r}: use {', '.join(CONFIGS)}, mixed:N or agreement.")
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        return table[kind](kind, cfg, device, Path(tmp), int(count) if count else cfg.adapters)


# ---- the report ----------------------------------------------------------------------------------------
def _ms(summary: dict, key: str, q: str) -> str:
    value = summary.get(key, {}).get(q)
    return "-" if value is None else f"{value * 1000:.0f}"


def serve_table(results: dict[str, dict]) -> str:
    """The throughput/latency table of the workload configurations (base, mixed, swap, peft)."""
    base = results.get("base", {}).get("tokens_per_s")
    lines = ["| config | output tokens/s | vs base | TTFT p50 (ms) | TTFT p95 (ms) | TPOT p50 (ms) | TPOT p95 (ms) "
             "| peak memory (GB) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "ttft_s" not in r:
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {_ms(r, 'ttft_s', 'p50')} | {_ms(r, 'ttft_s', 'p95')} "
                     f"| {_ms(r, 'tpot_s', 'p50')} | {_ms(r, 'tpot_s', 'p95')} | {r['peak_mem_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def decode_table(results: dict[str, dict]) -> str:
    """The batch-1 decoding table: the engine (base, unmerged, merged), generate, the limit, llama.cpp."""
    base = results.get("decode-base", {}).get("tokens_per_s")
    lines = ["| batch-1 decoding | tokens/s | vs decode-base | note |", "|---|---|---|---|"]
    for name, r in results.items():
        if "ttft_s" in r or name == "agreement":
            continue
        if "skipped" in r:
            lines.append(f"| {name} | - | - | skipped: {r['skipped']} |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {r.get('note', '')} |")
    return "\n".join(lines)


def bench_serve(cfg: BenchServeConfig) -> dict:
    """Run every configuration in its own subprocess and print the tables (or JSON).

    Returns:
        {"workload": ..., "configs": {name: measurements}}.
    """
    names = ["mixed", "http"] if cfg.http else cfg.configs
    results = {name: run_in_subprocess("lorakit.tools.bench_serve", name, cfg, "bench serve") for name in names}
    out = {"model": cfg.model or "default", "workload": {k: v for k, v in asdict(cfg).items() if k not in ("json", "configs")},
           "torch": torch.__version__, "configs": results}
    if cfg.json:
        print(json.dumps(out, indent=2))
    else:
        print(serve_table(results))
        if "http" in results and "mixed" in results:
            h = results["http"]
            print(f"\nhttp / mixed (the engine's own): {h['tokens_per_s'] / results['mixed']['tokens_per_s']:.2f}x; "
                  f"over HTTP: {h['failed']} failed requests, {h['status_5xx']} 5xx")
        if any("ttft_s" not in r and name != "agreement" for name, r in results.items()):
            print()
            print(decode_table(results))
        if "agreement" in results:
            a = results["agreement"]
            print(f"\nagreement ({a['dtype']}): {a['identical_requests']}/{a['requests']} requests token-identical to "
                  f"model.generate alone; {a['matching_token_fraction']:.1%} of tokens before the first difference")
    return out


if __name__ == "__main__":  # the per-configuration subprocess
    request = json.loads(sys.argv[1])
    print(json.dumps(run_config(request["name"], BenchServeConfig(**request["config"]))))
