"""Where a mixed batch's LoRA costs time, measured in one process with rounds interleaved (as
serve_strategies_ab.py), on the default model in bf16 with `lorakit bench serve`'s adapters (rank 8, all 7
projections).

    PYTHONPATH=src python benchmarks/serve_lora_cost.py phases --requests 64 --rounds 2
    PYTHONPATH=src python benchmarks/serve_lora_cost.py step --rounds 6
    PYTHONPATH=src python benchmarks/serve_lora_cost.py prompts --rounds 5 [--dtype fp32]

phases: the seeded workload on the base, mixed (8 adapters) and swap (one adapter's requests at a time), one
engine with the defaults; per configuration the seconds spent in forwards with new prompts (prefill), in forwards
that only decode, and in the rest (sampling, streaming, scheduling).
step: one decoding step alone (16 rows at position 200, the engine's step: compiled where it runs) with no
adapter, every row on one adapter, two rows per adapter (8) and one row per adapter (16); ms per step.
prompts: the LoRA branch of 16 new prompts (32-256 tokens, over 8 adapters) alone, every layer and group, as
the compiled kernel (`lora_segments_`) and as torch GEMMs (two per prompt, layer and group); ms per forward.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import statistics
import tempfile
import time

import torch

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.multi_lora import FusedPlan, LoraBatch
from lorakit.serve.step_batch import StepBatch
from lorakit.tools.serve_workload import (BenchServeConfig, make_workload, ms_per_step, serve_closed_loop,
                                          serve_one_adapter_at_a_time, summarize_handles, write_adapters)
from lorakit.training.models import compute_dtype, load_model


def engine_with_adapters(model, tokenizer, count: int, cfg: BenchServeConfig) -> Engine:
    paths = write_adapters(model, pathlib.Path(tempfile.mkdtemp()), cfg, count)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=cfg.concurrency, max_loaded_adapters=count,
                                                   max_seq_len=cfg.max_prompt_tokens + cfg.new_tokens))
    for k, path in enumerate(paths):
        engine.load_adapter(f"adapter{k}", path)
    return engine


def phases(model, tokenizer, requests: int, rounds: int) -> None:
    cfg = BenchServeConfig(requests=requests)
    engine = engine_with_adapters(model, tokenizer, cfg.adapters, cfg)
    workload = make_workload(cfg, tokenizer, cfg.adapters)
    spent = collections.Counter()
    forward = engine.runner.forward

    def timed_forward(batch: StepBatch) -> torch.Tensor:
        start = time.perf_counter()
        logits = forward(batch)
        spent["prefill" if batch.prefills else "decode"] += time.perf_counter() - start
        return logits

    engine.runner.forward = timed_forward

    def requests_for(kind: str, tokens: int) -> list[Request]:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        return [Request(p, adapter=None if kind == "base" else f"adapter{a}", params=params)
                for p, a in zip(workload.prompts, workload.adapter_of)]

    serve_closed_loop(engine, requests_for("mixed", 4)[:cfg.concurrency], cfg.concurrency)  # warm-up
    for round_ in range(rounds):
        for kind in ("base", "mixed", "swap"):
            spent.clear()
            start = time.perf_counter()
            if kind == "swap":
                handles, _ = serve_one_adapter_at_a_time(engine, requests_for(kind, cfg.new_tokens), cfg.concurrency)
            else:
                handles = serve_closed_loop(engine, requests_for(kind, cfg.new_tokens), cfg.concurrency)
            total = time.perf_counter() - start
            rate = summarize_handles(handles, total)["tokens_per_s"]
            print(f"round {round_ + 1} {kind:5s} {rate:6.1f} tokens/s  {total:5.2f} s: prefill {spent['prefill']:5.2f} s, "
                  f"decode {spent['decode']:5.2f} s, the rest {total - spent['prefill'] - spent['decode']:4.2f} s")


def step(model, tokenizer, rounds: int, rows: int = 16, position: int = 200) -> None:
    cfg = BenchServeConfig()
    engine = engine_with_adapters(model, tokenizer, rows, cfg)
    adapters = [engine.store.acquire(f"adapter{k}") for k in range(rows)]
    mixes = {"no adapter": None, "1 adapter": [adapters[0]] * rows,
             f"{rows // 2} adapters": [adapters[k // 2] for k in range(rows)], f"{rows} adapters": adapters}
    ids = lambda values: torch.tensor(values, dtype=torch.long)
    batches = {name: StepBatch(ids([5] * rows), ids([position] * rows), rows, [], ids(list(range(rows))),
                               None if mix is None else LoraBatch(FusedPlan(mix, engine.lora_kernel), []))
               for name, mix in mixes.items()}
    results: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(rounds):
        for name, batch in batches.items():
            results[name].append(ms_per_step(engine.runner.forward, batch, 15))
    base = statistics.median(results["no adapter"])
    print(f"one decoding step, {rows} rows at position {position} (steps {engine.decode_step}, LoRA "
          f"{engine.lora_strategy}, factors {str(engine.lora_dtype).replace('torch.', '')}):")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median:6.2f} ms  (+{median - base:4.2f} ms)  runs {[round(v, 2) for v in values]}")


def prompts(model, tokenizer, rounds: int) -> None:
    cfg = BenchServeConfig()
    engine = engine_with_adapters(model, tokenizer, cfg.adapters, cfg)
    adapters = [engine.store.acquire(f"adapter{k}") for k in range(cfg.adapters)]
    lengths = torch.randint(cfg.min_prompt_tokens, cfg.max_prompt_tokens + 1, (16,),
                            generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    segments, start = [], 0
    for k, length in enumerate(lengths):
        segments.append((start, start + length, adapters[k % len(adapters)]))
        start += length
    layout = engine.runner.layout[0]
    inputs = {lay.name: torch.randn(start, lay.in_features).to(engine.runner.dtype) for lay in layout}
    outputs = {lay.name: torch.zeros(start, sum(lay.out_sizes), dtype=engine.runner.dtype) for lay in layout}

    def forward(kernel) -> None:
        lora = LoraBatch(None, segments, kernel)
        for layer in range(len(engine.runner.layout)):
            for group in inputs:
                lora.apply(layer, group, inputs[group], outputs[group])

    ways = {"compiled (lora_segments_)": engine.segment_kernel, "torch GEMMs": None}
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, kernel in ways.items():
            forward(kernel)
            begin = time.perf_counter()
            forward(kernel)
            results[name].append((time.perf_counter() - begin) * 1e3)
    print(f"the LoRA branch of 16 prompts ({start} tokens) over {len(adapters)} adapters, every layer and group:")
    for name, values in results.items():
        print(f"  {name:26s} {statistics.median(values):7.1f} ms  runs {[round(v, 1) for v in values]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["phases", "step", "prompts"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="the model's dtype: auto (as bench serve: bf16 where the CPU "
                                                         "has it), fp32 or bf16")
    args = parser.parse_args()
    loaded = load_model("default", device=torch.device("cpu"), fast_cpu_attention=False)
    model = loaded.model.to(compute_dtype(args.dtype, torch.device("cpu")))
    if args.mode == "phases":
        phases(model, loaded.tokenizer, args.requests, args.rounds)
    elif args.mode == "step":
        step(model, loaded.tokenizer, args.rounds)
    else:
        prompts(model, loaded.tokenizer, args.rounds)


if __name__ == "__main__":
    main()
