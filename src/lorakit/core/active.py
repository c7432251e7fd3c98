"""Which adapters a model holds and which of them compute: the state every other core module reads.

Adapted modules are LoRA layers (`lorakit.core.layers.LoraLayer`) and `ModulesToSave` wrappers; each
keeps `active_adapters`. The configs `apply` used live on the model (`lora_configs`).
"""
from __future__ import annotations

import copy
from typing import Iterator

from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.layers import LoraLayer


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


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters that `apply` added to `model`, by adapter name (a live dict)."""
    if "lorakit_configs" not in model.__dict__:
        model.__dict__["lorakit_configs"] = {}
    return model.__dict__["lorakit_configs"]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all adapters present in `model`, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def require_lora(model: nn.Module, what: str) -> list[tuple[str, LoraLayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise LorakitError(
            f"{what}: {type(model).__name__} has no LoRA layer. Build it with lora.Linear / lora.Embedding / "
            "lora.Conv2d / lora.MergedLinear, or adapt an existing model with lorakit.apply(model, LoraConfig(...))."
        )
    return layers


def check_names(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown}; the model has {known}.")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the adapters that compute in the forward pass (the others stay, inactive)."""
    names = [names] if isinstance(names, str) else list(names)
    require_lora(model, "set_adapter")
    check_names(model, names)
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            module.active_adapters = [n for n in names if n in module.adapter_names]


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that compute in the forward pass."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.active_adapters))
    return list(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a layer left without adapters is replaced by the module it wrapped."""
    check_names(model, [name])
    for module_name, module in list(model.named_modules()):
        if isinstance(module, (LoraLayer, ModulesToSave)) and name in module.adapter_names:
            module.delete_adapter(name)
            if not module.adapter_names:
                base = module.base_layer if isinstance(module, LoraLayer) else module.original_module
                model.set_submodule(module_name, base)
    lora_configs(model).pop(name, None)
