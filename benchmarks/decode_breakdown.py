"""Where a batch-1 decoding step of the engine goes on this CPU (default model, fp32 or `--dtype bf16`).

Prints the memory bandwidth and the decoding limit it implies, the step's matrix products replayed alone
in each weight layout of `lorakit.serve.weights` (transposed `x @ W`, F.linear on nn.Linear's rows, oneDNN's
packed linear) and the one the engine chose here, the engine's own step, and torch.profiler's time per
token by operator category.

    PYTHONPATH=src .venv/bin/python benchmarks/decode_breakdown.py [--dtype bf16]
"""
import argparse

import torch

from gemv_kernels import median_ms  # this folder: Python puts a script's own folder on the path

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.weights import LAYOUTS, hold, packing_available, product
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
    print(f"weight layout chosen on this machine: {engine.runner.weight_layout}")
    usual = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]  # (d_out, d_in)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in usual}
    for layout in LAYOUTS:
        if layout == "packed" and not packing_available(dtype, device):
            continue
        held, multiply = [hold(w, layout) for w in usual], product(layout)
        ms = median_ms(lambda: [multiply(inputs[w.shape[1]], h) for w, h in zip(usual, held)], n=20)
        print(f"products alone, {layout}: {ms:.1f} ms ({nbytes / ms / 1e6:.1f} GB/s)")
        del held
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
