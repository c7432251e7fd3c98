"""A base model with an adapter directory applied: what `lorakit eval`, `generate`, `chat` and `merge` start from."""
from __future__ import annotations

from lorakit.training.models import LoadedModel


def base_model_for(model: str | None, adapter: str | None) -> str | None:
    """The base model to load: `model`, else the base recorded in the adapter's config, else None (the default).

    Args:
        model: a model spec (see `lorakit.training.models.load_model`), or None.
        adapter: an adapter directory, or None.

    Returns:
        The model spec.

    Raises:
        LorakitError: an unreadable adapter config.
    """
    if model or not adapter:
        return model
    from lorakit.methods.combine import base_model_of

    return base_model_of(adapter)


def load_with_adapter(model: str | None, adapter: str | None, device: str | None, precision: str = "auto",
                      quantize: str = "none") -> LoadedModel:
    """The base model in the compute dtype (quantized if asked) with the adapter applied, and its tokenizer.

    Args:
        model: the base model spec; None: the adapter's recorded base, else the embedded default.
        adapter: an adapter directory of any method, or of several combined; None: the base alone.
        device: cpu, cuda ...; None: cuda if available.
        precision: auto, bf16, fp16 or fp32 (see `compute_dtype`).
        quantize: none, nf4 or int8: hold the base's block linears quantized, as a QLoRA adapter was trained.

    Returns:
        The loaded model (with the adapter) and tokenizer.

    Raises:
        LorakitError: a model or adapter that cannot be loaded.
    """
    from lorakit.core.quantize import quantize_model
    from lorakit.methods.combine import load as load_adapter
    from lorakit.training.models import compute_dtype, load_model

    loaded = load_model(base_model_for(model, adapter), device=device)
    dtype = compute_dtype(precision, loaded.model.device)
    loaded.model.to(dtype)
    quantize_model(loaded.model, quantize, dtype)
    if adapter:
        load_adapter(loaded.model, adapter)
    return loaded
