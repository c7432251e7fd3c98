"""The API of microsoft/LoRA's `loralib`, so that loralib code runs with `import lorakit as lora`.

The classes build a fresh base module and wrap it in a lorakit LoRA layer (adapter "default").
Their state dicts use loralib's flat key names (`weight`, `bias`, `lora_A`, `lora_B`; `conv.weight` for
convolutions), so checkpoints move between loralib and lorakit models both ways.

One deliberate difference: loralib merges the update into the weight as a side effect of `.eval()`
(`merge_weights=True`). Here `.eval()` never changes weights; call `lorakit.merge(model)` to merge.
The argument is accepted so existing code runs; the outputs are the same either way.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.core.active import lora_layers
from lorakit.core.errors import LorakitError
from lorakit.core.layers import Conv, LoraLayer, TransposedLinear
from lorakit.core.layers import Embedding as _LoraEmbedding
from lorakit.core.layers import Linear as _LoraLinear
from lorakit.core.layers import MergedLinear as _LoraMergedLinear

ADAPTER = "default"


def _use_loralib_keys(module: nn.Module, key_map: dict[str, str]) -> None:
    """Expose `module`'s state dict under loralib's names; `key_map` is {our suffix: loralib suffix}."""

    def to_loralib(_module, state_dict, prefix, _metadata):
        for ours, theirs in key_map.items():
            if prefix + ours in state_dict:
                state_dict[prefix + theirs] = state_dict.pop(prefix + ours)

    def from_loralib(state_dict, prefix, *_args):
        for ours, theirs in key_map.items():
            if prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)

    module._register_state_dict_hook(to_loralib)
    module._register_load_state_dict_pre_hook(from_loralib)


def _key_map(layer: LoraLayer, base_prefix: str) -> dict[str, str]:
    keys = {f"base_layer.{n}": f"{base_prefix}{n}" for n, _ in layer.base_layer.named_parameters()}
    keys.update({f"{layer.a_name}.{ADAPTER}": "lora_A", f"{layer.b_name}.{ADAPTER}": "lora_B"})
    return keys


def _add_default_adapter(layer: LoraLayer, r: int, lora_alpha: float, lora_dropout: float) -> None:
    if r < 0:
        raise LorakitError(f"r={r} is invalid: use r > 0 for LoRA, or r=0 for a plain layer.")
    if r > 0:  # loralib's r=0 means "no LoRA": a plain layer
        layer.add_adapter(ADAPTER, r, lora_alpha, lora_dropout)


class Linear(_LoraLinear):
    """loralib's `lora.Linear(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out)`."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs):
        base = TransposedLinear(in_features, out_features, **kwargs) if fan_in_fan_out else nn.Linear(
            in_features, out_features, **kwargs)
        super().__init__(base)
        _add_default_adapter(self, r, lora_alpha, lora_dropout)
        _use_loralib_keys(self, _key_map(self, ""))


class MergedLinear(_LoraMergedLinear):
    """loralib's `lora.MergedLinear(..., enable_lora=[True, False, True])` for packed q/k/v projections."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: list[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        base = TransposedLinear(in_features, out_features, **kwargs) if fan_in_fan_out else nn.Linear(
            in_features, out_features, **kwargs)
        super().__init__(base, list(enable_lora))
        if any(enable_lora):
            _add_default_adapter(self, r, lora_alpha, lora_dropout)
        _use_loralib_keys(self, _key_map(self, ""))


class Embedding(_LoraEmbedding):
    """loralib's `lora.Embedding(num_embeddings, embedding_dim, r, lora_alpha)`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs):
        super().__init__(nn.Embedding(num_embeddings, embedding_dim, **kwargs))
        _add_default_adapter(self, r, lora_alpha, 0.0)
        _use_loralib_keys(self, _key_map(self, ""))


class _ConvLoRA(Conv):
    """loralib's convolution LoRA: A is (r*k) x (in*k), B is (out*k) x (r*k) for kernel size k, and the
    update (B A) is viewed as the kernel's shape. (lorakit.apply uses PEFT's layout instead.)"""

    conv_class: type[nn.Module] = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        if not isinstance(kernel_size, int):
            raise LorakitError(f"kernel_size={kernel_size!r}: loralib's conv LoRA takes an int kernel size.")
        self.kernel_size = kernel_size
        super().__init__(self.conv_class(in_channels, out_channels, kernel_size, **kwargs))
        _add_default_adapter(self, r, lora_alpha, lora_dropout)
        _use_loralib_keys(self, _key_map(self, "conv."))

    def factor_shapes(self, r):
        out_ch, in_ch = self.base_layer.weight.shape[:2]
        k = self.kernel_size
        return (r * k, in_ch * k), (out_ch * k, r * k)

    def lora_branch(self, x, name):
        base = self.base_layer
        x = self.lora_dropout[name](x)
        return self._conv(x, self.delta_weight(name).to(x.dtype), None, base.stride, base.padding, base.dilation)

    def delta_weight(self, name):
        A, B = self.factors(name)
        return (B.float() @ A.float()).view(self.base_layer.weight.shape) * self.scaling[name]

    def peft_shapes(self, r):
        raise LorakitError("loralib-style conv LoRA has no PEFT file layout; use lorakit.apply on an nn.Conv2d.")

    @torch.no_grad()
    def init_factors(self, name, init):
        A, B = self.factors(name)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)


class Conv1d(_ConvLoRA):
    conv_class = nn.Conv1d


class Conv2d(_ConvLoRA):
    conv_class = nn.Conv2d


class Conv3d(_ConvLoRA):
    conv_class = nn.Conv3d


def _lora_layer_names(model: nn.Module, what: str) -> list[str]:
    names = [name for name, _ in lora_layers(model)]
    if not names:
        hint = " (a plain nn.Linear has none: use lora.Linear(in, out, r=8) instead)" if isinstance(
            model, (nn.Linear, nn.Embedding, nn.Conv2d)) else ""
        raise LorakitError(
            f"{what}: {type(model).__name__} has no LoRA layer{hint}. Build LoRA layers with lora.Linear / "
            "lora.Embedding / lora.Conv2d / lora.MergedLinear, or adapt an existing model with "
            "lorakit.apply(model, lorakit.LoraConfig(target_modules=[...]))."
        )
    return names


def _check_bias(bias: str) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise LorakitError(f"bias={bias!r} is invalid: use 'none', 'all' or 'lora_only'.")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but the LoRA factors (every parameter whose name contains `lora_`), plus the
    biases chosen by `bias`: "none", "all", or "lora_only" (the biases of LoRA-adapted layers).

    Raises:
        LorakitError: the model has no LoRA layer, or `bias` is invalid.
    """
    _check_bias(bias)
    _lora_layer_names(model, "mark_only_lora_as_trainable")
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The part of `model.state_dict()` that LoRA training changes: the `lora_` entries, plus biases
    ("all": every bias; "lora_only": the biases of LoRA-adapted layers). Load it back with
    `model.load_state_dict(sd, strict=False)` on a model built the same way (lorakit's or loralib's)."""
    _check_bias(bias)
    names = _lora_layer_names(model, "lora_state_dict")
    state = model.state_dict()
    out = {k: v for k, v in state.items() if "lora_" in k or (bias == "all" and "bias" in k)}
    if bias == "lora_only":
        for name in names:
            for key in (f"{name}.bias", f"{name}.base_layer.bias", f"{name}.conv.bias"):
                if key in state:
                    out[key] = state[key]
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors of `model`, to hand to an optimizer: `torch.optim.Adam(lora.lora_parameters(model))`.

    Raises:
        LorakitError: the model has no LoRA layer (e.g. a plain nn.Linear).
    """
    _lora_layer_names(model, "lora_parameters")
    return [p for name, p in model.named_parameters() if "lora_" in name]
