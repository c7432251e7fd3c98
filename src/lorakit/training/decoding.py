"""Generation-time kernel choices: per LoRA layer shape, whether decoding steps on the CPU run the LoRA
branch in fp32 or in the activations' bf16/fp16 — measured once per machine (`lorakit.core.autotune`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.active import lora_layers
from lorakit.core.autotune import choose
from lorakit.core.layers import Linear


def choose_decode_dtype(d_in: int, d_out: int, r: int, dtype: torch.dtype) -> str:
    """"fp32" or the activations' dtype name: the faster LoRA branch for one token of a d_in -> d_out
    layer of rank r on this CPU (both add the same update; fp32 rounds once less)."""
    g = torch.Generator().manual_seed(0)
    x, result = torch.randn(1, d_in, generator=g).to(dtype), torch.randn(1, d_out, generator=g).to(dtype)
    A32, B32 = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    A, B = A32.to(dtype), B32.to(dtype)
    low = str(dtype).replace("torch.", "")

    def many(step):
        def run():
            for _ in range(200):  # one call is microseconds: time a batch of them
                step()
        return run

    candidates = {
        "fp32": many(lambda: result + F.linear(F.linear(x.float(), A32), B32).to(dtype)),
        low: many(lambda: torch.addmm(result, F.linear(x, A), B.T)),
    }
    return choose("lora_decode_dtype", f"{d_in}x{d_out} r{r} {low}", candidates, repeats=3)


def tune_lora_decoding(model: nn.Module) -> dict[str, int]:
    """Set every CPU LoRA Linear's `decode_fp32` from the measured choice for its shape.

    Returns:
        How many layers got each choice, e.g. {"fp32": 210}.
    """
    counts: dict[str, int] = {}
    for _, layer in lora_layers(model):
        weight = getattr(layer.base_layer, "weight", None)
        if not isinstance(layer, Linear) or weight is None or weight.device.type != "cpu":
            continue
        if weight.dtype not in (torch.bfloat16, torch.float16) or not layer.r:
            continue
        choice = choose_decode_dtype(layer.in_features, layer.out_features, max(layer.r.values()), weight.dtype)
        layer.decode_fp32 = choice == "fp32"
        counts[choice] = counts.get(choice, 0) + 1
    return counts
