"""Adapt an existing model without editing its code: match target modules, swap in LoRA layers, freeze the rest."""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass

from torch import nn

from . import dora
from .config import LoraConfig
from .errors import LorakitError
from .layers import LoraLayer, is_transposed_linear, lora_class_for

# Names of the block lists in common architectures (Llama "layers", GPT-2 "h", T5 "block", BERT "layer").
DEFAULT_LAYERS_PATTERN = "layers|h|block|blocks|layer"


class ModulesToSave(nn.Module):
    """A module trained in full beside the adapters (e.g. a new classification head).

    Keeps the original frozen and one trainable copy per adapter; the first active adapter that has a
    copy decides the forward. Names follow PEFT: `original_module`, `modules_to_save.<adapter>`.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    @property
    def weight(self):
        return self.current().weight

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


@dataclass
class Target:
    """One module that `apply` will adapt, with the rank and alpha it gets."""

    name: str
    module: nn.Module
    layer_class: type[LoraLayer]
    r: int
    lora_alpha: float


def _name_matches(patterns: list[str] | str | None, name: str) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if isinstance(layers_pattern, list):
        layers_pattern = "|".join(map(re.escape, layers_pattern))
    match = re.search(rf"(?:^|\.)(?:{layers_pattern or DEFAULT_LAYERS_PATTERN})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def pattern_value(pattern: dict, name: str, default):
    # PEFT's rule: the first key that matches the end of the name at a dot boundary wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


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
            if not _is_linear(base) or name in output_layers:
                continue
        elif not _name_matches(config.target_modules, name):
            continue
        if config.exclude_modules is not None and _name_matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None:
            if _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _find_modules_to_save(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in named_candidates(model) if n and _name_matches(names, n) and not isinstance(m, LoraLayer)]
    missing = [w for w in names if not any(_name_matches([w], n) for n, _ in found)]
    if missing:
        raise LorakitError(f"modules_to_save {missing} matched no module of the model; check the names with model.named_modules().")
    return found


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
    to_save = _find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    if config.init_lora_weights == "pissa" and any(t.layer_class.__name__ != "Linear" for t in targets):
        raise LorakitError("init_lora_weights='pissa' applies to linear layers only; narrow target_modules to them.")

    for target in targets:
        layer = target.module if isinstance(target.module, LoraLayer) else target.layer_class(target.module)
        layer.add_adapter(adapter_name, target.r, target.lora_alpha, config.lora_dropout, config.use_rslora,
                          config.init_lora_weights)
        if layer is not target.module:
            _set_submodule(model, target.name, layer)
    for name, module in to_save:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        if wrapper is not module:
            _set_submodule(model, name, wrapper)

    configs[adapter_name] = config
    from .adapters import set_adapter  # adapters builds on this module

    set_adapter(model, adapter_name)
    freeze_all_but(model, adapter_name, config.bias)
    return model


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters that `apply` added to `model`, by adapter name (a live dict)."""
    if "lorakit_configs" not in model.__dict__:
        model.__dict__["lorakit_configs"] = {}
    return model.__dict__["lorakit_configs"]


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
