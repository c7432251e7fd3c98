"""Managing the adapters of a model: activate, disable, delete, merge, unmerge, combine, summarize.

Every state change is an explicit call; `model.eval()` / `model.train()` never touch the weights.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from lorakit.core.active import (
    ModulesToSave,
    adapter_names,
    check_names,
    lora_configs,
    lora_layers,
    require_lora,
)
from lorakit.core.errors import LorakitError
from lorakit.core.factors import svd_factors, weighted_concat
from lorakit.core.layers import LoraLayer, MergedLinear
from lorakit.core.quantize import dequantize_model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (no adapter, original saved modules).

    Raises:
        LorakitError: if an adapter is merged (its update is inside the weights); unmerge first.
    """
    modules = [m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    if any(isinstance(m, LoraLayer) and m.merged_adapters for m in modules):
        raise LorakitError("an adapter is merged into the weights, so it cannot be disabled; call lorakit.unmerge(model) first.")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


def _refuse_tied(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    # A weight tied to another module (GPT-2's wte and lm_head) would change that module too.
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{name}.{pname}")
    for name, layer in layers:
        others = [h for h in holders.get(id(layer.base_layer.weight), []) if not h.startswith(name + ".")]
        if others and any(n in layer.r for n in layer.active_adapters):
            raise LorakitError(
                f"{name}'s weight is tied to {others[0]}; merging would change both. Keep this adapter unmerged, "
                f"or untie the weights first (copy {others[0].rsplit('.', 1)[0]}'s weight into its own parameter)."
            )


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights; the forward pass then costs what
    the base model costs. `unmerge` restores the weights exactly.

    Raises:
        LorakitError: an adapter is already merged or would put NaN/Inf into the weights (the model is
            then left as it was).
    """
    layers = require_lora(model, "merge")
    if adapter_names is not None:
        check_names(model, adapter_names)
    for _, layer in layers:
        names = [n for n in (adapter_names or layer.active_adapters) if n in layer.r]
        already = [n for n in names if n in layer.merged_adapters]
        if already:
            raise LorakitError(f"adapter(s) {already} are already merged; call lorakit.unmerge(model) before merging again.")
    _refuse_tied(model, layers)
    done: list[LoraLayer] = []
    try:
        for _, layer in layers:
            layer.merge([n for n in (adapter_names or layer.active_adapters) if n in layer.r])
            done.append(layer)
    except LorakitError:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Take every merged update out of the weights, restoring them exactly."""
    for _, layer in require_lora(model, "unmerge"):
        layer.unmerge()


def check_mergeable(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Refuse what `merge_and_unload` would refuse, changing nothing: no LoRA layer, a LoRA layer on a
    weight tied to another module, or an active update holding NaN/Inf.

    Returns:
        The model's LoRA layers, (name, layer).

    Raises:
        LorakitError: naming the module or adapter and what to do.
    """
    layers = require_lora(model, "merge_and_unload")
    _refuse_tied(model, layers)
    for _, layer in layers:  # check all before writing any
        for name in layer.active_adapters:
            if not torch.isfinite(layer.delta_weight(name)).all():
                raise LorakitError(f"adapter {name!r} holds NaN/Inf; refusing to merge it into the weights.")
    return layers


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the weights and give back the plain base architecture.

    LoRA layers become the modules they wrapped (with updated weights); saved modules become the active
    adapter's trained copy. The result has no lorakit module left in it; bitsandbytes 4-bit/8-bit layers
    (a QLoRA base) become plain nn.Linear layers in their compute dtype, dequantized before the merge.

    Raises:
        LorakitError: if an update holds NaN/Inf (nothing is changed then).
    """
    for _, layer in require_lora(model, "merge_and_unload"):
        layer.unmerge()  # the checks below see each update against the unmerged weight (DoRA's norms)
    check_mergeable(model)
    # A quantized (QLoRA) base is dequantized to its compute dtype first: an update is never rounded into 4 bits.
    dequantize_model(model)
    for module_name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(keep_original=False)
            model.set_submodule(module_name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            model.set_submodule(module_name, module.current())
    model.__dict__.pop("lorakit_configs", None)
    return model


def add_weighted_adapter(
    model: nn.Module,
    names: list[str],
    weights: list[float],
    new_name: str,
    combination: str = "linear",
    svd_rank: int | None = None,
) -> None:
    """Add adapter `new_name` whose update is sum_i weights[i] * update of names[i].

    Args:
        combination: "linear" stacks the factors (rank = sum of ranks): the combined update is exact
            (PEFT calls this "cat"). "svd" takes the best rank-`svd_rank` approximation of the sum
            (default rank: the largest of the inputs).

    Raises:
        LorakitError: unknown names, mismatched lengths, an existing new_name, or an unknown combination.
    """
    if combination not in ("linear", "cat", "svd"):
        raise LorakitError(f"combination={combination!r} is invalid: use 'linear' (exact) or 'svd'.")
    if len(names) != len(weights) or not names:
        raise LorakitError(f"give one weight per adapter: {len(names)} names, {len(weights)} weights.")
    check_names(model, names)
    if new_name in adapter_names(model):
        raise LorakitError(f"adapter {new_name!r} already exists; choose another new_name.")
    for _, layer in lora_layers(model):
        if isinstance(layer, MergedLinear):
            raise LorakitError("add_weighted_adapter does not support MergedLinear layers.")
    ranks: dict[str, int] = {}
    for layer_name, layer in lora_layers(model):
        present = [(n, w) for n, w in zip(names, weights) if n in layer.r]
        if not present:
            continue
        # Each factor as a matrix: B2 (rows x r), A2 (r x cols), with delta = scaling * B2 @ A2.
        mats = [(layer.factors(n)[1].flatten(1), layer.factors(n)[0].flatten(1), layer.scaling[n]) for n, _ in present]
        if combination == "svd":
            delta = sum(w * s * (B2.float() @ A2.float()) for (B2, A2, s), (_, w) in zip(mats, present))
            B2, A2 = svd_factors(delta, svd_rank or max(layer.r[n] for n, _ in present))
        else:
            B2, A2 = weighted_concat(mats, [w for _, w in present])
        r = ranks[layer_name] = A2.shape[0]
        layer.add_adapter(new_name, r, lora_alpha=r)  # scaling 1: the weights are inside B
        A, B = layer.factors(new_name)
        with torch.no_grad():
            A.copy_(A2.reshape(A.shape))
            B.copy_(B2.reshape(B.shape))
        layer.active_adapters.remove(new_name)
    configs = lora_configs(model)
    if names[0] in configs:
        # Ranks differ per module; alpha = r everywhere keeps scaling at 1, as the factors were built.
        pattern = {re.escape(n): r for n, r in ranks.items()}
        top = max(ranks.values())
        configs[new_name] = configs[names[0]].replace(
            target_modules=sorted(ranks), exclude_modules=None, layers_to_transform=None,
            r=top, lora_alpha=top, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False, init_lora_weights=True)


@dataclass
class Summary:
    """Parameter counts of an adapted model and the modules that carry LoRA."""

    trainable_params: int
    total_params: int
    modules: list[tuple[str, str, dict[str, int]]] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        lines = [f"{'module':<60} {'type':<10} ranks"]
        lines += [f"{name:<60} {kind:<10} {ranks}" for name, kind, ranks in self.modules]
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )
        return "\n".join(lines)


def summary(model: nn.Module, print_summary: bool = True) -> Summary:
    """Trainable vs total parameters, and each LoRA module with its ranks; printed unless told not to."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips tied duplicates
        if id(param) in seen:
            continue
        seen.add(id(param))
        # a 4-bit (QLoRA) weight stores two values per byte: count the weights its quant_state describes
        n = math.prod(param.quant_state.shape) if getattr(param, "quant_state", None) is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    modules = [(name, type(layer).__name__, dict(layer.r)) for name, layer in lora_layers(model)]
    result = Summary(trainable, total, modules)
    if print_summary:
        print(result)
    return result
