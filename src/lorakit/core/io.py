"""Adapter files in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` (no adapter name), biases and saved
modules under their own paths. Tensors go through safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lorakit.core.active import (
    ModulesToSave,
    adapter_names,
    delete_adapter,
    lora_configs,
    lora_layers,
)
from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_write_bytes, atomic_write_text
from lorakit.core.inject import apply, find_targets
from lorakit.core.matching import pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _default_adapter(model: nn.Module) -> str:
    names = adapter_names(model)
    if not names:
        raise LorakitError("the model has no adapter to save; add one with lorakit.apply(model, LoraConfig(...)).")
    return names[0]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under PEFT's key names."""
    config = lora_configs(model).get(adapter_name)
    bias = config.bias if config else "none"
    out: dict[str, torch.Tensor] = {}
    saved_prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter_name].named_parameters():
                out[f"{PREFIX}{name}.{pname}"] = param
            saved_prefixes.append(name + ".")
    for name, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        for suffix, tensor in _export_factors(layer, adapter_name).items():
            out[f"{PREFIX}{name}.{suffix}"] = tensor
        if bias == "lora_only" and layer.bias is not None:
            out[f"{PREFIX}{name}.base_layer.bias"] = layer.bias
    if bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and not any(pname.startswith(p) for p in saved_prefixes):
                out[f"{PREFIX}{pname}"] = param
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _export_factors(layer, adapter_name: str) -> dict[str, torch.Tensor]:
    tensors = layer.to_peft(adapter_name)
    initial = getattr(layer, "pissa_initial", {}).get(adapter_name)
    if initial is None:
        return tensors
    # A PiSSA adapter trains on top of the residual W - s B0 A0. Against the original W its update is
    # s (B A - B0 A0) = s [B, -B0] [A; A0]: an ordinary LoRA of rank 2r that any base model can load.
    A0, B0 = initial
    (a_key, A), (b_key, B) = tensors.items()
    return {a_key: torch.cat([A, A0], dim=0), b_key: torch.cat([B, -B0], dim=1)}


def adapter_config_dict(model: nn.Module, adapter_name: str) -> dict:
    """The config to write: the one `apply` recorded, with each module's real rank where it differs."""
    config = lora_configs(model).get(adapter_name)
    layers = [(n, l) for n, l in lora_layers(model) if adapter_name in l.r]
    if config is None:  # a model built from lora.Linear & co.: describe its layers exactly
        config = LoraConfig(r=layers[0][1].r[adapter_name], lora_alpha=layers[0][1].lora_alpha[adapter_name],
                            target_modules=[n for n, _ in layers])
    # Exact per-module entries go first: PEFT takes the first pattern that matches a module.
    exact_r: dict[str, int] = {}
    exact_alpha: dict[str, float] = {}
    for name, layer in layers:
        file_r = next(iter(_export_factors(layer, adapter_name).values())).shape[0]
        alpha = layer.lora_alpha[adapter_name]
        if file_r != layer.r[adapter_name]:
            # A MergedLinear (r per slice, rank r*k in the file) or a PiSSA adapter (rank 2r in the
            # file): keep the same scaling factor at the file's rank.
            alpha = layer.scaling[adapter_name] * (file_r ** 0.5 if config.use_rslora else file_r)
        if pattern_value(config.rank_pattern, name, config.r) != file_r:
            exact_r[re.escape(name)] = file_r
        if pattern_value(config.alpha_pattern, name, config.lora_alpha) != alpha:
            exact_alpha[re.escape(name)] = alpha
    rank_pattern = {**exact_r, **config.rank_pattern}
    alpha_pattern = {**exact_alpha, **config.alpha_pattern}
    data = config.replace(
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        init_lora_weights=True if config.init_lora_weights == "pissa" else config.init_lora_weights,
        fan_in_fan_out=any(getattr(l, "fan_in_fan_out", False) for _, l in layers),
    ).to_dict()
    return data


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the first) to `directory` in PEFT's format.

    Each file is written atomically (temp file, then rename), the weights before the config.

    Returns:
        The directory.
    """
    adapter_name = adapter_name or _default_adapter(model)
    if adapter_name not in adapter_names(model):
        raise LorakitError(f"the model has no adapter {adapter_name!r}; it has {adapter_names(model)}.")
    return write_adapter_files(directory, adapter_config_dict(model, adapter_name), adapter_state_dict(model, adapter_name))


def write_adapter_files(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter_model.safetensors, then adapter_config.json, each atomically; returns the directory."""
    from safetensors.torch import save

    directory = Path(directory)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return directory


def save_method_files(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a non-LoRA method's tensors (detached copies) and config dict to `directory` in PEFT's format."""
    return write_adapter_files(directory, config, {k: v.detach().contiguous().clone() for k, v in tensors.items()})


def load_method_files(
    model: nn.Module,
    directory: str | Path,
    read_config: Callable[..., Any],
    attach: Callable[[nn.Module, Any], Any],
    parameters_of: Callable[[nn.Module], dict[str, torch.Tensor]],
    detach: Callable[[nn.Module], Any],
    is_trainable: bool,
) -> nn.Module:
    """Add the method saved in `directory` to `model`: the shared load path of IA3, adapters, prefix, prompt.

    `read_config(dict, source=...)` parses adapter_config.json, `attach(model, config)` adds fresh modules,
    `parameters_of(model)` names the tensors the file fills, `detach(model)` takes them out again.

    Raises:
        LorakitError: missing/corrupt files or tensors that do not fit (the model is then unchanged).
    """
    config = read_config(read_config_json(directory), source=str(directory))
    tensors = read_adapter_tensors(directory)
    attach(model, config)
    try:
        copy_named_tensors(parameters_of(model), tensors, str(directory))
    except LorakitError:
        detach(model)
        raise
    if not is_trainable:
        model.requires_grad_(False)
    return model


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig stored in an adapter directory.

    Raises:
        LorakitError: the file is missing, not JSON, or holds unknown or unsupported fields.
    """
    return LoraConfig.from_dict(read_config_json(directory), source=str(Path(directory) / CONFIG_NAME))


def read_config_json(directory: str | Path) -> dict:
    """The JSON object in an adapter directory's adapter_config.json, for any method.

    Raises:
        LorakitError: the file is missing, not JSON, or not a JSON object.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LorakitError(f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LorakitError(f"{path} is not valid JSON ({type(e).__name__}: {e}); the adapter directory is corrupt, "
                           "save it again.") from e
    if not isinstance(data, dict):
        raise LorakitError(f"{path} must hold a JSON object with the adapter's config fields.")
    return data


@torch.no_grad()
def copy_named_tensors(dest: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors[key] into dest[key] for every key, after checking that the keys and shapes agree.

    Raises:
        LorakitError: a key is missing or extra, or a shape differs (nothing is copied then).
    """
    missing, extra = sorted(dest.keys() - tensors.keys()), sorted(tensors.keys() - dest.keys())
    if missing or extra:
        raise LorakitError(
            f"{source}: the adapter does not fit this model: {len(missing)} tensor(s) missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}); it was saved for another architecture or config."
        )
    for key, param in dest.items():
        if tuple(param.shape) != tuple(tensors[key].shape):
            raise LorakitError(f"{source}: {key} expects shape {tuple(param.shape)}, the file has {tuple(tensors[key].shape)}.")
    for key, param in dest.items():
        param.copy_(tensors[key])


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (safetensors, never pickle).

    Raises:
        LorakitError: the file is missing, truncated or corrupt.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (lorakit reads safetensors only; re-save a .bin adapter with PEFT's safe_serialization=True)" if (
            Path(directory) / "adapter_model.bin").is_file() else ""
        raise LorakitError(f"{path} not found{hint}.")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise LorakitError(f"{path} is truncated or corrupt ({e}); save the adapter again.") from e
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise LorakitError(f"{path}: tensor {key!r} has dtype {tensor.dtype}; adapter weights are floating point. "
                               "The file is corrupt or not an adapter.")
        if not bool(torch.isfinite(tensor).all()):
            raise LorakitError(f"{path}: tensor {key!r} holds NaN or Inf values; the adapter is corrupt "
                               "(or its training diverged), use an earlier checkpoint.")
    return tensors


def check_ranks_against_file(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every module the config targets has its A factor in the file, with the rank the config gives it.

    Run before `apply`: a config may ask for any rank, and allocating it first (r = 10**9) exhausts memory.

    Raises:
        LorakitError: a factor missing, or a rank in the config that the file's tensors contradict.
    """
    for target in find_targets(model, config):
        a_name = target.layer_class.a_name
        keys = [f"{PREFIX}{target.name}.{a_name}.weight", f"{PREFIX}{target.name}.{a_name}"]
        found = next((tensors[k] for k in keys if k in tensors), None)
        if found is None:
            raise LorakitError(f"{source}: tensor {keys[0]!r} is missing; the adapter does not fit this model "
                               f"(module {target.name}).")
        if found.dim() == 0 or found.shape[0] % target.r:
            raise LorakitError(f"{source}: the config gives module {target.name} rank {target.r}, but its "
                               f"{a_name} in the file has shape {tuple(found.shape)}; the config and weights disagree.")


def load_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Add the adapter saved in `directory` (by lorakit or PEFT) to `model` as `adapter_name`.

    Args:
        is_trainable: keep the adapter's parameters (and its biases and saved modules) trainable, to
            continue training; by default the whole model is frozen, for inference.

    Returns:
        The same model, with the adapter active.

    Raises:
        LorakitError: missing/corrupt files, or tensors whose names or shapes do not fit the model (the
            message names the module, the expected and the found shape). The model is then unchanged.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    if config.init_lora_weights == "pissa":
        raise LorakitError(
            f"{directory} holds a PiSSA adapter saved without conversion; it only fits a PiSSA residual base. "
            "Save it with lorakit (which converts it to a plain LoRA) or PEFT's path_initial_model_for_weight_conversion."
        )
    check_ranks_against_file(model, config, tensors, str(directory))
    # The factors come from the file: skip random/SVD init work that would be overwritten.
    apply(model, config.replace(init_lora_weights=True), adapter_name)
    try:
        copy_adapter_tensors(model, adapter_name, tensors, str(directory))
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    if not is_trainable:
        model.requires_grad_(False)
    return model


@torch.no_grad()
def copy_adapter_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    remaining = dict(tensors)
    # Check everything first, then copy: a bad file never leaves a half-loaded adapter.
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        wanted = {}
        for suffix, shape in layer.peft_shapes(layer.r[adapter_name]).items():
            key = f"{PREFIX}{name}.{suffix}"
            if key not in remaining:
                raise LorakitError(f"{source}: tensor {key!r} is missing; the adapter does not fit this model (module {name}).")
            found = tuple(remaining[key].shape)
            if found != tuple(shape):
                raise LorakitError(
                    f"{source}: module {name} expects {suffix} of shape {tuple(shape)} but the file has {found}; "
                    "the adapter was trained on a different base model or rank."
                )
            wanted[suffix] = remaining.pop(key)
        plan.append((layer, wanted))
        base_weight_key = f"{PREFIX}{name}.base_layer.weight"  # PEFT saves targeted embeddings' base too
        if base_weight_key in remaining:
            plan.append((layer.base_layer.weight, remaining.pop(base_weight_key)))
    params = {f"{PREFIX}{n}": p for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter_name].named_parameters():
                params[f"{PREFIX}{name}.{pname}"] = param
                # PEFT with bias="all" also writes the copy's bias under this name
                params[f"{PREFIX}{name}.modules_to_save.{pname}"] = param
    for key in list(remaining):
        if key in params:
            if tuple(params[key].shape) != tuple(remaining[key].shape):
                raise LorakitError(f"{source}: {key} expects shape {tuple(params[key].shape)}, the file has {tuple(remaining[key].shape)}.")
            plan.append((params[key], remaining.pop(key)))
    if remaining:
        raise LorakitError(
            f"{source}: {len(remaining)} tensor(s) match no module of this model, e.g. {sorted(remaining)[:3]}; "
            "the adapter was saved for another architecture."
        )
    for dest, value in plan:
        if isinstance(dest, torch.Tensor):
            dest.copy_(value)
        else:
            dest.load_peft(adapter_name, value)
