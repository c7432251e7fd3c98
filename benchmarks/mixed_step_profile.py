"""Where a decoding step of 16 rows goes in the engine, on the base and on 8 adapters (the mixed batch).

Default model in bf16, 16 requests with 64-token prompts, 10 decoding steps timed and 10 profiled
(torch.profiler self time per step, the top operators).

    PYTHONPATH=src .venv/bin/python benchmarks/mixed_step_profile.py [gather|segment] [fp32|bf16]

The arguments pick the engine's LoRA strategy and the dtype of its LoRA factors (default: gather, fp32).
"""
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.tools.serve_workload import BenchServeConfig, write_adapters
from lorakit.training.models import load_model


def main(strategy: str = "gather", lora_dtype: str = "fp32", rows: int = 16, adapters: int = 8, steps: int = 10) -> None:
    loaded = load_model(None, device=torch.device("cpu"), fast_cpu_attention=False)
    loaded.model.to(torch.bfloat16)
    engine = Engine(loaded.model, loaded.tokenizer,
                    EngineConfig(max_batch_size=rows, max_seq_len=512, max_loaded_adapters=adapters,
                                 lora_strategy=strategy, lora_dtype=lora_dtype))
    print(f"weight layout: {engine.runner.weight_layout}, LoRA strategy: {strategy}, factors: {lora_dtype}")
    tmp = tempfile.TemporaryDirectory()  # kept until the end: the engine may read an adapter again
    for k, path in enumerate(write_adapters(engine.model, Path(tmp.name), BenchServeConfig(), adapters)):
        engine.load_adapter(f"adapter{k}", path)
    prompt = list(range(100, 164))
    for kind in ("base", "mixed"):
        handles = [engine.submit(Request(prompt, adapter=None if kind == "base" else f"adapter{i % adapters}",
                                         params=SamplingParams(max_tokens=4 * steps, ignore_eos=True)))
                   for i in range(rows)]
        for _ in range(3):  # the prompts' prefill, then decoding only
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        print(f"{kind}: {(time.perf_counter() - start) * 1e3 / steps:.1f} ms a step")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
            print(f"  {e.key:50s} {e.self_cpu_time_total / 1e3 / steps:7.2f} ms  {e.count // steps} calls")
        for handle in handles:
            handle.cancel()
        while engine.rows or engine.queue:
            engine.step()
    tmp.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:3])
