"""The methods `lorakit train --method NAME` can run, by name, and which one reads a saved adapter's files.

Adding a method: one module in lorakit/methods with a `lorakit.methods.base.Method` class, plus its line
in METHODS (and its options dataclass as a group of TrainConfig, when it has new options). "a+b" runs
several methods in one model (lorakit.methods.combine).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.io import CONFIG_NAME
from lorakit.methods.adalora import AdaLoraMethod
from lorakit.methods.base import Method
from lorakit.methods.bottleneck import BottleneckMethod
from lorakit.methods.ia3 import IA3Method
from lorakit.methods.lora import DoraMethod, LoraMethod, PissaMethod
from lorakit.methods.prefix import PrefixMethod
from lorakit.methods.prompt_tuning import PromptMethod

# --method name -> method class; the order is the one `--help` and errors list.
METHODS: dict[str, type[Method]] = {m.name: m for m in (
    LoraMethod, DoraMethod, PissaMethod, AdaLoraMethod, IA3Method, BottleneckMethod, PrefixMethod, PromptMethod,
)}

# adapter_config.json's peft_type -> the method that loads, merges and describes such files: the first
# registered with that type (the LoRA variants and AdaLoRA all write plain LoRA files).
LOADERS: dict[str, type[Method]] = {
    peft_type: next(m for m in METHODS.values() if m.peft_type == peft_type)
    for peft_type in dict.fromkeys(m.peft_type for m in METHODS.values())
}


def loader_for(config: dict[str, Any], where: str) -> type[Method]:
    """The method that reads an adapter directory whose adapter_config.json holds `config` (found at `where`).

    Raises:
        LorakitError: a peft_type lorakit does not read.
    """
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type not in LOADERS:
        raise LorakitError(f"{where}/{CONFIG_NAME}: peft_type {peft_type!r} is not one lorakit reads; "
                           f"it reads {', '.join(LOADERS)}.")
    return LOADERS[peft_type]


def method_names(spec: str) -> list[str]:
    """The names in a --method value ("lora", "lora+prefix", ...), in order.

    Raises:
        LorakitError: an unknown or empty name, listing the known ones.
    """
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names or any(n not in METHODS for n in names):
        raise LorakitError(f"unknown method {spec!r}: use one of {', '.join(METHODS)}, or several joined by '+'.")
    return names


def make_methods(cfg: Any) -> list[Method]:
    """The methods `cfg.method` names, each built from the option groups of `cfg` (a TrainConfig).

    Raises:
        LorakitError: an unknown method name, or an invalid option of a named method.
    """
    return [METHODS[name](cfg) for name in method_names(cfg.method)]


def optimizer_groups(methods: list[Method], model: nn.Module, lr: float,
                     overrides: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups for `methods` in `model`: each parameter at lr x its method's ratio
    (`overrides[name]`, else the method's `lr_ratio`) x its group's ratio.

    Parameters sharing a learning rate share a group, each group in the model's parameter order (so a
    checkpoint's optimizer state fits the same run's groups).

    Returns:
        [{"params": [...], "lr": lr}, ...] for torch.optim.

    Raises:
        LorakitError: a trainable parameter no method claims, or one claimed twice.
    """
    order = {id(p): i for i, p in enumerate(model.parameters())}
    rates: dict[int, float] = {}
    for method in methods:
        ratio = overrides.get(method.name, method.lr_ratio)
        for group in method.parameter_groups(model):
            for param in group.params:
                if id(param) in rates:
                    raise LorakitError(f"a parameter of method {method.name!r} is claimed by another method too; "
                                       "give the methods disjoint targets.")
                rates[id(param)] = lr * ratio * group.lr_ratio
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in rates]
    if stray:
        raise LorakitError(f"{len(stray)} trainable parameter(s) belong to no method (e.g. {stray[0]}); "
                           "freeze them, or train them through a method.")
    by_lr: dict[float, list[nn.Parameter]] = {}
    for param in sorted((p for p in model.parameters() if id(p) in rates), key=lambda p: order[id(p)]):
        by_lr.setdefault(rates[id(param)], []).append(param)
    return [{"params": params, "lr": rate} for rate, params in by_lr.items()]
