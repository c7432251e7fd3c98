"""Where a batch-1 decoding step of the engine goes on this CPU (default model, fp32 or `--dtype bf16`).

Prints the memory bandwidth and the decoding limit it implies, the step's matrix products replayed alone
in two kernels (the engine's `x @ W^T` on weights stored transposed, and F.linear on the usual (d_out, d_in)
layout), the engine's own step, and torch.profiler's time per token by operator category.

    PYTHONPATH=src .venv/bin/python benchmarks/decode_breakdown.py [--dtype bf16]
"""
import argparse

import torch
import torch.nn.functional as F

from gemv_kernels import median_ms  # this folder: Python puts a script's own folder on the path

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.tools.roofline import memory_bandwidth
from lorakit.tools.step_profile import profile_step
from lorakit.training.models import load_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[parser.parse_args().dtype]
    device = torch.device("cpu")
    loaded = load_model(None, device=device, fast_cpu_attention=False)
    model = loaded.model.to(dtype)
    bandwidth = memory_bandwidth(device)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, weights {nbytes / 1e6:.0f} MB, limit {bandwidth / nbytes:.1f} tokens/s")
    engine = Engine(model, loaded.tokenizer, EngineConfig(max_batch_size=1, max_seq_len=512, max_loaded_adapters=1))
    transposed = [w for layer in engine.runner.layers for w in layer.weights.values()]  # (d_in, d_out)
    usual = [w.T.contiguous() for w in transposed]  # (d_out, d_in), as nn.Linear holds it
    head_t = engine.runner.head_weight  # (d, vocab), as the engine holds it
    head = head_t.T.contiguous()  # (vocab, d), as nn.Linear holds it
    inputs = {w.shape[0]: torch.randn(1, w.shape[0], dtype=dtype) for w in transposed}
    mm_ms = median_ms(lambda: [torch.mm(inputs[w.shape[0]], w) for w in transposed + [head_t]], n=20)
    linear_ms = median_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in usual + [head]], n=20)
    print(f"products alone: x @ W^T {mm_ms:.1f} ms ({nbytes / mm_ms / 1e6:.1f} GB/s), "
          f"F.linear {linear_ms:.1f} ms ({nbytes / linear_ms / 1e6:.1f} GB/s)")
    prompt = loaded.tokenizer("Hello there, tell me about", add_special_tokens=False)["input_ids"]

    def per_token(n=64):
        c = engine.generate([Request(prompt, params=SamplingParams(max_tokens=n, ignore_eos=True))])[0]
        return (c.total_s - c.ttft_s) / (c.completion_tokens - 1)
    per_token(8)
    print(f"engine step {1e3 * min(per_token() for _ in range(3)):.1f} ms")
    profile = profile_step(lambda: per_token(32), steps=1)
    print("per token (ms):", {k: round(v * 1e3 / 31, 2) for k, v in profile.items()})


if __name__ == "__main__":
    main()
