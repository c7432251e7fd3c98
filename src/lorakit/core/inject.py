"""Adapt an existing model without editing its code: match target modules, swap in LoRA layers, freeze the rest."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core import dora
from lorakit.core.active import ModulesToSave, lora_configs, set_adapter
from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.layers import LoraLayer, lora_class_for
from lorakit.core.matching import is_linear, layer_index, name_matches, pattern_value


@dataclass
class Target:
    """One module that `apply` will adapt, with the rank and alpha it gets."""

    name: str
    module: nn.Module
    layer_class: type[LoraLayer]
    r: int
    lora_alpha: float


def _output_layer_names(model: nn.Module) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def named_candidates(model: nn.Module):
    """(name, module) for every module `apply` may consider: LoRA internals and saved copies excluded."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules `config` selects, validated, without changing the model.

    Raises:
        LorakitError: when target_modules is missing, matches nothing (naming the closest module names), or
            matches a module type lorakit cannot adapt.
    """
    if config.target_modules is None:
        raise LorakitError(
            "target_modules is not set: name the modules to adapt, e.g. target_modules=['q_proj', 'v_proj'], "
            "or use 'all-linear'."
        )
    all_linear = config.target_modules == "all-linear"
    output_layers = _output_layer_names(model) if all_linear else set()
    targets: list[Target] = []
    for name, module in named_candidates(model):
        if not name:
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if all_linear:
            if not is_linear(base) or name in output_layers:
                continue
        elif not name_matches(config.target_modules, name):
            continue
        if config.exclude_modules is not None and name_matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None:
            if layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        layer_class = type(module) if isinstance(module, LoraLayer) else lora_class_for(base)
        if layer_class is None:
            raise LorakitError(
                f"target_modules={config.target_modules!r} matched {name!r} ({type(base).__name__}), which lorakit "
                "cannot adapt: LoRA applies to Linear, Conv1D, Embedding and Conv1d/2d/3d layers. Name those layers instead."
            )
        layer_class = dora.layer_class_for(name, module, layer_class, config.use_dora)
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        targets.append(Target(name, module, layer_class, r, alpha))
    if not targets:
        raise LorakitError(_no_match_message(model, config))
    return targets


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and lora_class_for(m) is not None})
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w.rsplit(".", 1)[-1], adaptable, n=3, cutoff=0.5)})
    hint = f"closest names: {', '.join(close)}" if close else f"adaptable module names: {', '.join(adaptable[:20])}"
    extra = " (after exclude_modules / layers_to_transform)" if config.exclude_modules or config.layers_to_transform else ""
    return f"target_modules {config.target_modules!r} matched nothing{extra}; {hint}."


def _find_modules_to_save(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in named_candidates(model) if n and name_matches(names, n) and not isinstance(m, LoraLayer)]
    missing = [w for w in names if not any(name_matches([w], n) for n, _ in found)]
    if missing:
        raise LorakitError(f"modules_to_save {missing} matched no module of the model; check the names with model.named_modules().")
    return found


def free_memory_bytes(device: torch.device) -> int:
    """Memory that a new allocation on `device` can still use (MemAvailable on the host)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            line = next(l for l in f if l.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_factor_memory(targets: list[Target]) -> None:
    """Refuse ranks whose factors would need more memory than is free, before allocating any of them.

    A layer's factors hold r x (d_out + d_in) values (d_in: the rest of a conv/embedding weight's dims), in fp32
    at most.
    """
    need: dict[torch.device, int] = {}
    for t in targets:
        weight = getattr(t.module, "weight", None)
        if weight is None or weight.dim() == 0:
            continue
        rows = weight.shape[0]
        need[weight.device] = need.get(weight.device, 0) + 4 * t.r * (rows + weight.numel() // max(rows, 1))
    for device, nbytes in need.items():
        free = free_memory_bytes(device)
        if nbytes > free:
            raise LorakitError(f"the LoRA factors at these ranks need {nbytes / 2**30:.1f} GiB on {device}, more than "
                               f"the {free / 2**30:.1f} GiB free; lower r / rank_pattern.")


def apply(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to the modules `config` targets, in place, and freeze everything else.

    The targeted modules are wrapped by LoRA layers (a module that already has LoRA gets another adapter);
    the new adapter becomes the active one; only its parameters (and the biases and modules_to_save
    that the config names) keep requires_grad.

    Args:
        model: any torch module, e.g. a transformers model.
        config: what to adapt and how.
        adapter_name: the name under which the adapter is stored and saved.

    Returns:
        The same model object, adapted.

    Raises:
        LorakitError: for a name already in use or targets that cannot be found or adapted; the model is
            then unchanged.
    """
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}.")
    configs = lora_configs(model)
    if adapter_name in configs:
        raise LorakitError(f"the model already has an adapter named {adapter_name!r}; pass another adapter_name.")
    targets = find_targets(model, config)
    check_factor_memory(targets)
    to_save = _find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    if config.init_lora_weights == "pissa" and any(t.layer_class.__name__ != "Linear" for t in targets):
        raise LorakitError("init_lora_weights='pissa' applies to linear layers only; narrow target_modules to them.")

    for target in targets:
        layer = target.module if isinstance(target.module, LoraLayer) else target.layer_class(target.module)
        layer.add_adapter(adapter_name, target.r, target.lora_alpha, config.lora_dropout, config.use_rslora,
                          config.init_lora_weights)
        if layer is not target.module:
            model.set_submodule(target.name, layer)
    for name, module in to_save:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        if wrapper is not module:
            model.set_submodule(name, wrapper)

    configs[adapter_name] = config
    set_adapter(model, adapter_name)
    freeze_all_but(model, adapter_name, config.bias)
    return model


def freeze_all_but(model: nn.Module, adapter_name: str, bias: str = "none") -> None:
    """requires_grad only for adapter `adapter_name`'s factors and saved modules, and the chosen biases."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            for param in module.adapter_parameters(adapter_name):
                param.requires_grad_(True)
            if bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
