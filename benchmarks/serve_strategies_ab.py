"""The per-row LoRA strategies side by side in one process, rounds interleaved, so that the drift of a shared
machine's speed (+-20% between processes here) hits every configuration alike.

    PYTHONPATH=src python benchmarks/serve_strategies_ab.py mixed  --requests 32 --rounds 3
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py decode --rounds 8
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py layouts --rounds 8
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py steps --rounds 8
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py mixed-steps --requests 32 --rounds 3
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py mixed-layouts --requests 32 --rounds 3
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py step-layouts --rounds 4
    PYTHONPATH=src python benchmarks/serve_strategies_ab.py targets --requests 64 --rounds 3

mixed: the seeded `lorakit bench serve` workload (8 rank-8 adapters on all 7 projections, 16 in flight) through
one engine per configuration on the same model: base (no adapters), fused, fused with bf16 factors, gather;
prints each one's median output tokens/s and its ratio to the base.
decode: batch-1 decoding (64 tokens) on the base and with one unmerged adapter, fused vs gather (whose
one-adapter path is two torch GEMMs per group); prints median tokens/s and the ratio to the base.
layouts: batch-1 decoding on the base and with one unmerged adapter (fused), weights packed vs gemv vs tiles.
steps: batch-1 decoding on the base and with one unmerged adapter (fused), decoding steps as torch ops vs one
compiled call (EngineConfig.decode_step).
mixed-steps: the mixed workload, base and fused, decoding steps as torch ops vs one compiled call.
mixed-layouts: the mixed workload, base and fused (the defaults otherwise), weights held gemv vs tiles.
step-layouts: one decoding step alone (no adapter, at position 200) of 1, 4, 8 and 16 rows, weights held gemv vs
tiles; ms per step.
targets: issue 12's throughput ratios in one process, rounds interleaved, one engine with the defaults and 64
adapters loaded: the workload on the base, mixed (over 8 adapters), swap (one adapter's requests at a time, as
`lorakit bench serve`'s swap row), mixed:1 and mixed:64 (every request on one adapter; spread over 64), and
llama.cpp's single-stream decoding (the default model's Q4_1 file, as its bench row). --layout: the engine's
weight layout (default auto).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import torch

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.step_batch import StepBatch
from lorakit.tools.serve_workload import (BenchServeConfig, make_workload, ms_per_step, serve_closed_loop,
                                          serve_one_adapter_at_a_time, summarize_handles, write_adapters)
from lorakit.training.models import compute_dtype, load_model


def engines(model, tokenizer, configs: list[str], rows: int, seq_len: int, paths: list[pathlib.Path],
            layout: str = "auto") -> dict:
    made = {}
    for config in configs:
        # "fused:bf16": the fused strategy with bf16 factors; "base@torch": decoding steps as torch ops
        config_, _, step = config.partition("@")
        strategy, _, dtype = config_.partition(":")
        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=rows, max_seq_len=seq_len, lora_dtype=dtype or "auto",
                                                       lora_strategy="gather" if strategy == "base" else strategy,
                                                       weight_layout=layout, decode_step=step or "auto"))
        for k, path in enumerate(paths):
            engine.load_adapter(f"adapter{k}", path)
        made[config] = engine
    return made


def report(results: dict[str, list[float]], base: float) -> None:
    for config, values in results.items():
        median = statistics.median(values)
        print(f"{config:12s} {median:7.1f} tokens/s  {median / base:.3f}x base  runs {[round(v, 1) for v in values]}")


def mixed(model, tokenizer, requests: int, rounds: int, by: str = "strategy") -> None:
    cfg = BenchServeConfig(requests=requests)
    paths = write_adapters(model, pathlib.Path(tempfile.mkdtemp()), cfg, cfg.adapters)
    workload = make_workload(cfg, tokenizer, cfg.adapters)
    seq_len = cfg.max_prompt_tokens + cfg.new_tokens
    if by == "layout":  # "fused/tiles": the fused strategy, weights held tiled
        made = {f"{config}/{layout}": engine for layout in ("gemv", "tiles")
                for config, engine in engines(model, tokenizer, ["base", "fused"], cfg.concurrency, seq_len, paths,
                                              layout).items()}
    else:
        configs = ["base@compiled", "base@torch", "fused@compiled", "fused:bf16@compiled", "fused@torch"] \
            if by == "step" else ["base", "fused", "fused:bf16", "gather"]
        made = engines(model, tokenizer, configs, cfg.concurrency, seq_len, paths,
                       "gemv" if by == "step" else "auto")  # the compiled step reads the rows that gemv holds
    configs = list(made)

    def requests_for(config: str, tokens: int) -> list[Request]:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        return [Request(p, adapter=None if config.startswith("base") else f"adapter{a}", params=params)
                for p, a in zip(workload.prompts, workload.adapter_of)]

    for config, engine in made.items():  # warm-up: kernel choices, first touches
        serve_closed_loop(engine, requests_for(config, 4)[:cfg.concurrency], cfg.concurrency)
    results: dict[str, list[float]] = {config: [] for config in made}
    for _ in range(rounds):
        for config, engine in made.items():
            start = time.perf_counter()
            handles = serve_closed_loop(engine, requests_for(config, cfg.new_tokens), cfg.concurrency)
            results[config].append(summarize_handles(handles, time.perf_counter() - start)["tokens_per_s"])
    report(results, statistics.median(results[configs[0]]))


def targets(model, tokenizer, requests: int, rounds: int, layout: str = "auto") -> None:
    import llama_cpp

    from lorakit.training.models import default_gguf_path

    cfg = BenchServeConfig(requests=requests)
    paths = write_adapters(model, pathlib.Path(tempfile.mkdtemp()), cfg, 64)
    workload = make_workload(cfg, tokenizer, cfg.adapters)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=cfg.concurrency, max_loaded_adapters=64,
                                                   max_seq_len=cfg.max_prompt_tokens + cfg.new_tokens,
                                                   weight_layout=layout))
    for k, path in enumerate(paths):
        engine.load_adapter(f"adapter{k}", path)
    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    text = tokenizer.decode(workload.prompts[0][:cfg.min_prompt_tokens])
    spread = torch.randint(0, 64, (len(workload.prompts),), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    adapters = {"base": [None] * len(spread), "mixed": workload.adapter_of, "swap": workload.adapter_of,
                "mixed:1": [0] * len(spread), "mixed:64": spread}

    def requests_for(kind: str, tokens: int) -> list[Request]:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        return [Request(p, adapter=None if a is None else f"adapter{a}", params=params)
                for p, a in zip(workload.prompts, adapters[kind])]

    def llama_cpp_tokens_per_s(n: int = 128) -> float:
        times = [time.perf_counter() for _ in llm.create_completion(text, max_tokens=n, temperature=0.0, stream=True,
                                                                    logit_bias={llm.token_eos(): -1e9})]
        return (len(times) - 1) / (times[-1] - times[0])

    def served(kind: str) -> float:
        start = time.perf_counter()
        if kind == "swap":
            handles, waited = serve_one_adapter_at_a_time(engine, requests_for(kind, cfg.new_tokens), cfg.concurrency)
        else:
            handles, waited = serve_closed_loop(engine, requests_for(kind, cfg.new_tokens), cfg.concurrency), None
        return summarize_handles(handles, time.perf_counter() - start, waited)["tokens_per_s"]

    serve_closed_loop(engine, requests_for("mixed:64", 4)[:cfg.concurrency], cfg.concurrency)  # warm-up
    llama_cpp_tokens_per_s(16)
    results: dict[str, list[float]] = {kind: [] for kind in ("base", "mixed", "swap", "mixed:1", "mixed:64", "llama.cpp")}
    for _ in range(rounds):
        for kind in results:
            results[kind].append(llama_cpp_tokens_per_s() if kind == "llama.cpp" else served(kind))
    report(results, statistics.median(results["base"]))
    median = {kind: statistics.median(values) for kind, values in results.items()}
    print(f"mixed / swap {median['mixed'] / median['swap']:.2f}x, mixed / llama.cpp "
          f"{median['mixed'] / median['llama.cpp']:.2f}x, mixed:64 / mixed:1 {median['mixed:64'] / median['mixed:1']:.2f}x "
          f"(engine: steps {engine.decode_step}, weights {engine.runner.weight_layout}, LoRA {engine.lora_strategy}, "
          f"factors {str(engine.lora_dtype).replace('torch.', '')})")


def step_layouts(model, tokenizer, rounds: int, position: int = 200) -> None:
    made = {layout: Engine(model, tokenizer, EngineConfig(max_batch_size=16, max_seq_len=position + 64,
                                                          weight_layout=layout)) for layout in ("gemv", "tiles")}
    ids = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    results: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for rows in (1, 4, 8, 16):
            batch = StepBatch(ids([5] * rows), ids([position] * rows), rows, [], ids(list(range(rows))), None)
            for layout, engine in made.items():
                results.setdefault((rows, layout), []).append(ms_per_step(engine.runner.forward, batch, 10))
    print(f"one decoding step at position {position}, no adapter (steps {made['tiles'].decode_step}):")
    for rows in (1, 4, 8, 16):
        gemv, tiles = (statistics.median(results[rows, layout]) for layout in made)
        print(f"  {rows:2d} rows: gemv {gemv:6.2f} ms  tiles {tiles:6.2f} ms  ({gemv / tiles:.2f}x)")


def decode(model, tokenizer, rounds: int, by: str = "strategy") -> None:
    cfg = BenchServeConfig()
    paths = write_adapters(model, pathlib.Path(tempfile.mkdtemp()), cfg, 1)
    prompt = "The history of the printing press begins"
    if by == "layout":  # one fused engine per weight layout
        made = {layout: engines(model, tokenizer, ["fused"], 1, 256, paths, layout)["fused"] for layout in ("packed", "gemv", "tiles")}
        runs = [(f"{layout} {name}", layout, adapter) for layout in made for name, adapter in (("base", None), ("lora", "adapter0"))]
    elif by == "step":  # one fused engine per way of running decoding steps
        made = engines(model, tokenizer, ["fused@compiled", "fused@torch"], 1, 256, paths)
        runs = [(f"{config.split('@')[1]} {name}", config, adapter) for config in made
                for name, adapter in (("base", None), ("lora", "adapter0"))]
    else:
        made = engines(model, tokenizer, ["fused", "gather"], 1, 256, paths)
        runs = [("base", "fused", None), ("fused", "fused", "adapter0"), ("gather", "gather", "adapter0")]

    def tokens_per_s(engine: Engine, adapter: str | None, n: int = 64) -> float:
        done = engine.generate([Request(prompt, adapter=adapter, params=SamplingParams(max_tokens=n, ignore_eos=True))])[0]
        return (done.completion_tokens - 1) / (done.total_s - done.ttft_s)

    for _, config, adapter in runs:
        tokens_per_s(made[config], adapter, 8)
    results: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, config, adapter in runs:
            results[name].append(tokens_per_s(made[config], adapter))
    report(results, statistics.median(results[runs[0][0]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["mixed", "decode", "layouts", "steps", "mixed-steps", "mixed-layouts",
                                         "step-layouts", "targets"])
    parser.add_argument("--layout", default="auto", help="targets: the engine's weight layout")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model("default", device=torch.device("cpu"), fast_cpu_attention=False)
    model = loaded.model.to(compute_dtype("auto", torch.device("cpu")))  # bf16 where the CPU has it, as bench serve
    if args.mode == "step-layouts":
        step_layouts(model, loaded.tokenizer, args.rounds)
    elif args.mode == "targets":
        targets(model, loaded.tokenizer, args.requests, args.rounds, args.layout)
    elif args.mode in ("mixed", "mixed-steps", "mixed-layouts"):
        mixed(model, loaded.tokenizer, args.requests, args.rounds,
              by={"mixed": "strategy", "mixed-steps": "step", "mixed-layouts": "layout"}[args.mode])
    else:
        decode(model, loaded.tokenizer, args.rounds, by={"decode": "strategy", "layouts": "layout", "steps": "step"}[args.mode])


if __name__ == "__main__":
    main()
