"""`lorakit merge`: fold an adapter into its base and save a standard transformers model directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorakit.core.errors import LorakitError
from lorakit.training.loading import base_model_for


@dataclass
class MergeConfig:
    adapter: str | None = None
    """Adapter directory to fold into the base weights."""
    output: str | None = None
    """Where to write the merged transformers model directory."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """dtype of the written weights."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Merge onto the base as a QLoRA adapter saw it: quantized, then dequantized to fp32 (none: the original weights)."""


def run_merge(cfg: MergeConfig) -> Path:
    """Write base + adapter as a standard transformers model directory (AutoModelForCausalLM loads it).

    Returns:
        The written directory.

    Raises:
        LorakitError: no --adapter or --output, or a model or adapter that cannot be loaded or merged.
    """
    import torch

    from lorakit.core.fsutil import atomic_directory
    from lorakit.core.quantize import quantize_model
    from lorakit.methods.combine import load as load_adapter
    from lorakit.methods.combine import merge_and_unload
    from lorakit.training.models import compute_dtype, load_model

    if not cfg.adapter or not cfg.output:
        raise LorakitError("lorakit merge needs --adapter DIR and --output DIR.")
    loaded = load_model(base_model_for(cfg.model, cfg.adapter))
    model = loaded.model  # merge in fp32, then cast: no rounding of the update into bf16 before the sum
    quantize_model(model, cfg.quantize, torch.float32)  # merge_and_unload dequantizes it to fp32
    load_adapter(model, cfg.adapter)
    merged = merge_and_unload(model)
    merged.to(compute_dtype(cfg.precision, merged.device))
    with atomic_directory(cfg.output) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    print(f"merged model written to {cfg.output}")
    return Path(cfg.output)
