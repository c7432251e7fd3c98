"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP on the output of a block's attention
and/or MLP, where that output joins the residual stream.

    h' = h + W_up act(W_down h + b_down) + b_up        W_down: (m, d), W_up: (d, m), m << d

W_up starts at zero, so each adapter is the identity at step 0. The nonlinearity means an adapter never
folds into a weight: it stays a module. Adapters sit in forward hooks on the adapted modules (each holds
its adapter as the child `bottleneck`), so module names do not change and LoRA on the same model keeps
PEFT's keys. PEFT has no bottleneck adapters: the files are lorakit's own, in the same directory layout
(adapter_config.json with peft_type "BOTTLENECK", adapter_model.safetensors). One adapter set per model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import config_from_dict
from lorakit.core.errors import LorakitError
from lorakit.core.io import PREFIX
from lorakit.core.matching import name_matches
from lorakit.methods.base import ModuleFunctions, ModuleMethod

PEFT_TYPE = "BOTTLENECK"
_CONFIG_KEY = "lorakit_bottleneck_config"
PLACEMENTS = ("both", "attention", "mlp")
# The attention and MLP modules of each block, by model type.
BLOCK_MODULES: dict[str, dict[str, str]] = {
    "llama": {"attention": "self_attn", "mlp": "mlp"},
    "mistral": {"attention": "self_attn", "mlp": "mlp"},
    "qwen2": {"attention": "self_attn", "mlp": "mlp"},
    "gpt2": {"attention": "attn", "mlp": "mlp"},
}
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class BottleneckConfig:
    """Where the adapters go and how wide they are.

    Args:
        bottleneck_size: m, the adapter's inner width.
        placement: "attention", "mlp" or "both": after which sublayers of every block.
        target_modules: explicit module names (suffixes) whose output gets an adapter; overrides placement.
        nonlinearity: "gelu", "relu" or "silu".
        init_weights: True: W_up = 0 (identity at step 0); False: random W_up (for tests).
        base_model_name_or_path: the base model (recorded).
        task_type: recorded, as in PEFT configs.

    Raises:
        LorakitError: an invalid size, placement or nonlinearity.
    """

    bottleneck_size: int = 32
    placement: str = "both"
    target_modules: list[str] | None = None
    nonlinearity: str = "gelu"
    init_weights: bool = True
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise LorakitError(f"bottleneck_size={self.bottleneck_size!r} is invalid: use a positive integer, e.g. 32.")
        if self.placement not in PLACEMENTS:
            raise LorakitError(f"placement={self.placement!r} is invalid: use one of {', '.join(PLACEMENTS)}.")
        if self.nonlinearity not in ACTIVATIONS:
            raise LorakitError(f"nonlinearity={self.nonlinearity!r} is invalid: use one of {', '.join(ACTIVATIONS)}.")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peft_type": PEFT_TYPE}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "BottleneckConfig":
        """Read a saved config; raises LorakitError for another peft_type or unknown fields."""
        return config_from_dict(cls, data, PEFT_TYPE, source)


class Bottleneck(nn.Module):
    """One adapter, h -> h + up(act(down(h))), applied by a forward hook to its host module's output."""

    def __init__(self, hidden_size: int, size: int, nonlinearity: str, init: bool, device: torch.device) -> None:
        super().__init__()
        dtype = torch.float32  # trained in fp32 over any base dtype, as LoRA factors
        self.down_weight = nn.Parameter(torch.empty(size, hidden_size, device=device, dtype=dtype))
        self.down_bias = nn.Parameter(torch.zeros(size, device=device, dtype=dtype))
        self.up_weight = nn.Parameter(torch.zeros(hidden_size, size, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        self.nonlinearity = nonlinearity
        with torch.no_grad():  # nn.Linear's init for W_down; W_up stays 0 unless asked otherwise
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
            if not init:
                nn.init.kaiming_uniform_(self.up_weight, a=math.sqrt(5))
        self.handle = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # (..., d) -> (..., m) -> (..., d), in the activations' dtype
        inner = ACTIVATIONS[self.nonlinearity](F.linear(h, self.down_weight.to(h.dtype), self.down_bias.to(h.dtype)))
        return h + F.linear(inner, self.up_weight.to(h.dtype), self.up_bias.to(h.dtype))


def _hook(module: nn.Module, args, output):
    # Attention modules return (hidden, attention weights, ...); MLPs return the hidden states.
    if isinstance(output, tuple):
        return (module.bottleneck(output[0]), *output[1:])
    return module.bottleneck(output)


def bottlenecks(model: nn.Module) -> list[tuple[str, Bottleneck]]:
    """(name of the adapted module, its adapter) for every bottleneck adapter in `model`."""
    return [(n.removesuffix(".bottleneck"), m) for n, m in model.named_modules() if isinstance(m, Bottleneck)]


def _target_names(model: nn.Module, config: BottleneckConfig) -> list[str]:
    if config.target_modules is not None:
        wanted = config.target_modules
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in BLOCK_MODULES:
            raise LorakitError(f"bottleneck adapters have no default placement for model type {model_type!r}; "
                               "name the attention/MLP modules in target_modules (e.g. ['self_attn', 'mlp']).")
        parts = ("attention", "mlp") if config.placement == "both" else (config.placement,)
        wanted = [BLOCK_MODULES[model_type][p] for p in parts]
    names = [n for n, _ in model.named_modules() if n and name_matches(wanted, n)]
    if not names:
        raise LorakitError(f"bottleneck target_modules {wanted} matched no module of the model.")
    return names


def apply(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Add an adapter after each targeted module, in place; only the adapters stay trainable.

    Returns:
        The same model.

    Raises:
        LorakitError: the model already has bottleneck adapters, has no hidden_size in its config, or the
            targets match nothing.
    """
    if bottlenecks(model):
        raise LorakitError("the model already has bottleneck adapters; lorakit holds one set per model.")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        raise LorakitError("bottleneck adapters need the model's hidden size: a transformers model with config.hidden_size.")
    names = _target_names(model, config)
    model.requires_grad_(False)
    device = next(model.parameters()).device
    for name in names:
        host = model.get_submodule(name)
        host.bottleneck = Bottleneck(hidden, config.bottleneck_size, config.nonlinearity, config.init_weights, device)
        host.bottleneck.handle = host.register_forward_hook(_hook)
    model.__dict__[_CONFIG_KEY] = dataclasses.replace(config, target_modules=names)
    return model


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by key (PEFT-style `base_model.model.` prefix)."""
    return {f"{PREFIX}{name}.bottleneck.{p}": t for name, b in bottlenecks(model) for p, t in b.named_parameters()}


def _remove_parts(model: nn.Module) -> None:
    """Take the adapters and their hooks out of the model."""
    for name, adapter in bottlenecks(model):
        adapter.handle.remove()
        del model.get_submodule(name).bottleneck


FUNCTIONS = ModuleFunctions(
    read_config=BottleneckConfig.from_dict, apply=apply, tensors=state_dict,
    remove_parts=_remove_parts, part_type=Bottleneck, config_key=_CONFIG_KEY,
    missing='the model has no bottleneck adapters to save; add them with lorakit.methods.bottleneck.apply.')
save, load, remove = FUNCTIONS.save, FUNCTIONS.load, FUNCTIONS.remove


@dataclass
class BottleneckOptions:
    """`--method adapter`'s options."""

    bottleneck_size: int = 32
    """Bottleneck adapters (--method adapter): inner width of each adapter."""
    adapter_placement: Literal["both", "attention", "mlp"] = "both"
    """Bottleneck adapters: after each block's attention, its MLP, or both."""


class BottleneckMethod(ModuleMethod):
    """`--method adapter`: bottleneck adapters, which stay modules (never merged)."""

    name, options, peft_type, title = "adapter", BottleneckOptions, PEFT_TYPE, "bottleneck adapters"
    functions = FUNCTIONS
    described = ("bottleneck_size", "nonlinearity", "target_modules")

    @staticmethod
    def configure(options: BottleneckOptions) -> BottleneckConfig:
        return BottleneckConfig(bottleneck_size=options.bottleneck_size, placement=options.adapter_placement)
