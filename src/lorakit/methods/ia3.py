"""IA3 (Liu et al. 2022): learned vectors that rescale a layer's activations, in PEFT's file format.

A targeted linear layer gets a vector l that multiplies its output (d_out) or, for a feed-forward layer
(the MLP's down projection), its input (d_in):

    y = l * (W x + b)        or        y = W (l * x) + b

l starts at ones, so the model is unchanged at step 0, and folds exactly into W (and b) when merged.
File keys are PEFT's: `base_model.model.<module>.ia3_l`, (d_out, 1) or (1, d_in).
One IA3 adapter per model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.config import config_from_dict
from lorakit.core.errors import LorakitError
from lorakit.core.inject import named_candidates
from lorakit.core.io import PREFIX
from lorakit.core.layers import LoraLayer, is_transposed_linear
from lorakit.core.matching import is_linear, name_matches
from lorakit.methods.base import ModuleFunctions, ModuleMethod, Row, Shapes

PEFT_TYPE = "IA3"
_CONFIG_KEY = "lorakit_ia3_config"

# PEFT's defaults by model type: (target_modules, feedforward_modules).
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


@dataclass
class IA3Config:
    """Which linear layers get an IA3 vector, with PEFT's `IA3Config` field names.

    Args:
        target_modules: names or name suffixes of linear layers, or a regex on the full name; None: the
            defaults for the model's type (DEFAULT_TARGETS).
        feedforward_modules: the targets whose input (not output) is rescaled; must be among the targets.
        exclude_modules: names never to adapt.
        init_ia3_weights: True: l = 1 (the model is unchanged); False: random (for tests).
        fan_in_fan_out: written for PEFT (GPT-2's Conv1D stores W as d_in x d_out); lorakit reads the
            layout from the module.
        base_model_name_or_path: the base model (recorded).
        task_type: PEFT's task type, recorded.

    Raises:
        LorakitError: a feed-forward module that is not a target.
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            raise LorakitError(f"feedforward_modules {sorted(set(feedforward) - set(targets))} are not in target_modules "
                               f"{targets}; every feed-forward module must also be a target.")

    def to_dict(self) -> dict[str, Any]:
        """The config as a PEFT adapter_config.json dict."""
        return {**dataclasses.asdict(self), "peft_type": PEFT_TYPE, "modules_to_save": None, "inference_mode": True}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "IA3Config":
        """Read a config written by lorakit or PEFT; raises LorakitError for unknown or unsupported fields."""
        return config_from_dict(cls, data, PEFT_TYPE, source, unsupported={"modules_to_save": None})


class IA3Layer(nn.Module):
    """A linear layer (nn.Linear or GPT-2's Conv1D) with an IA3 vector `ia3_l` on its output or input."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, init: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = is_transposed_linear(base_layer)
        weight = base_layer.weight
        d_in, d_out = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        shape = (1, d_in) if is_feedforward else (d_out, 1)  # PEFT's shapes
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        values = torch.ones(shape, dtype=dtype, device=weight.device)
        self.ia3_l = nn.Parameter(values if init else values + 0.1 * torch.randn_like(values))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype), *args, **kwargs)  # (..., d_in) * (d_in,)
        out = self.base_layer(x, *args, **kwargs)
        return out * scale.to(out.dtype)  # (..., d_out) * (d_out,)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the vector folded into its weight (and bias, for an output vector)."""
        base, scale = self.base_layer, self.ia3_l.float().flatten()
        # W is (d_out, d_in), or (d_in, d_out) when transposed: find the axis the vector runs along.
        out_axis = 1 if self.fan_in_fan_out else 0
        axis = 1 - out_axis if self.is_feedforward else out_axis
        view = [1, 1]
        view[axis] = -1
        base.weight.copy_((base.weight.float() * scale.view(view)).to(base.weight.dtype))
        if not self.is_feedforward and getattr(base, "bias", None) is not None:
            base.bias.copy_((base.bias.float() * scale).to(base.bias.dtype))
        return base


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Layer]]:
    """(name, layer) for every IA3 layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer)]


def _resolve(model: nn.Module, config: IA3Config) -> IA3Config:
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise LorakitError(f"IA3 has no default target modules for model type {model_type!r}; set target_modules "
                           "and feedforward_modules (e.g. ['k_proj', 'v_proj', 'down_proj'] and ['down_proj']).")
    targets, feedforward = DEFAULT_TARGETS[model_type]
    return dataclasses.replace(config, target_modules=targets,
                               feedforward_modules=config.feedforward_modules or feedforward)


def apply(model: nn.Module, config: IA3Config) -> nn.Module:
    """Wrap the targeted linear layers in IA3 layers, in place; only the IA3 vectors stay trainable.

    Returns:
        The same model.

    Raises:
        LorakitError: the model already has IA3, a target matches nothing or is not a linear layer, or it
            already carries LoRA (IA3 and LoRA need disjoint target modules).
    """
    if ia3_layers(model):
        raise LorakitError("the model already has IA3 vectors; lorakit holds one IA3 adapter per model.")
    config = _resolve(model, config)
    targets = []
    for name, module in named_candidates(model):
        if not name or not name_matches(config.target_modules, name) or name_matches(config.exclude_modules, name):
            continue
        if isinstance(module, LoraLayer):
            raise LorakitError(f"{name} already has LoRA; give IA3 and LoRA disjoint target modules.")
        if not is_linear(module):
            raise LorakitError(f"IA3 target {name} is a {type(module).__name__}; IA3 applies to linear layers.")
        targets.append((name, module))
    if not targets:
        raise LorakitError(f"IA3 target_modules {config.target_modules!r} matched no module of the model.")
    model.requires_grad_(False)
    for name, module in targets:
        feedforward = name_matches(config.feedforward_modules, name)
        model.set_submodule(name, IA3Layer(module, feedforward, config.init_ia3_weights))
    transposed = any(layer.fan_in_fan_out for _, layer in ia3_layers(model))
    model.__dict__[_CONFIG_KEY] = dataclasses.replace(config, fan_in_fan_out=transposed)
    return model


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The IA3 vectors under PEFT's keys."""
    return {f"{PREFIX}{name}.ia3_l": layer.ia3_l for name, layer in ia3_layers(model)}


def _remove_parts(model: nn.Module) -> None:
    """Take the IA3 layers out again (the original modules come back, unchanged)."""
    for name, layer in ia3_layers(model):
        model.set_submodule(name, layer.base_layer)


FUNCTIONS = ModuleFunctions(
    read_config=IA3Config.from_dict, apply=apply, tensors=state_dict,
    remove_parts=_remove_parts, part_type=IA3Layer, config_key=_CONFIG_KEY,
    missing='the model has no IA3 adapter to save; add one with lorakit.methods.ia3.apply(model, IA3Config()).')
save, load, remove = FUNCTIONS.save, FUNCTIONS.load, FUNCTIONS.remove


def check_mergeable(model: nn.Module) -> None:
    """Raises LorakitError if an IA3 vector holds NaN/Inf (a corrupt adapter) or sits on a quantized weight."""
    for name, layer in ia3_layers(model):
        if not layer.base_layer.weight.is_floating_point():
            raise LorakitError(f"{name}'s weight is quantized; IA3 cannot be merged into it. Load the base unquantized.")
        if not torch.isfinite(layer.ia3_l).all():
            raise LorakitError(f"{name}'s IA3 vector holds NaN/Inf; refusing to merge it into the weights.")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every IA3 vector into its layer's weight and put the plain layers back.

    Raises:
        LorakitError: a vector holds NaN/Inf, or a weight is quantized (nothing is changed then).
    """
    check_mergeable(model)
    for name, layer in ia3_layers(model):
        model.set_submodule(name, layer.merged_base())
    model.__dict__.pop(_CONFIG_KEY, None)
    return model


@dataclass
class IA3Options:
    """`--method ia3`'s options."""

    ia3_target_modules: list[str] = field(default_factory=list)
    """IA3: modules whose activations it rescales; empty: PEFT's defaults for the model (Llama: k_proj,v_proj,down_proj)."""
    ia3_feedforward_modules: list[str] = field(default_factory=list)
    """IA3: the targets whose input (not output) it rescales; empty: the defaults (Llama: down_proj)."""


class IA3Method(ModuleMethod):
    """`--method ia3`: IA3 vectors on the targets; they fold into the weights when merged."""

    name, options, peft_type, title = "ia3", IA3Options, PEFT_TYPE, "IA3 vectors"
    # One vector per layer: far fewer numbers than LoRA's factors, which need larger steps (4e-3 at the
    # default --lr 2e-4).
    lr_ratio = 20.0
    mergeable = True
    functions = FUNCTIONS
    described = ("target_modules", "feedforward_modules")

    @staticmethod
    def configure(options: IA3Options) -> IA3Config:
        return IA3Config(target_modules=options.ia3_target_modules or None,
                         feedforward_modules=options.ia3_feedforward_modules or None, task_type="CAUSAL_LM")

    # refuse NaN/Inf and quantized weights; fold every vector into its weight and unwrap the layers
    check_merge = staticmethod(check_mergeable)
    merge = staticmethod(merge_and_unload)

    @classmethod
    def describe(cls, config: dict[str, Any], shapes: Shapes) -> list[Row]:
        return super().describe(config, shapes) + [("adapted_modules", len(shapes))]
