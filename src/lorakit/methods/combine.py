"""Several parameter-efficient methods in one model and one adapter directory.

Directory layout, PEFT's own for several adapters: the first method's files at the root, each later
method's in a subdirectory named after it, and `lorakit_methods.json` listing them in order:

    adapter/adapter_config.json, adapter_model.safetensors    e.g. LoRA (PEFT loads this part from here)
    adapter/prefix/adapter_config.json, ...                   the prefix (PEFT loads it with subfolder="prefix")
    adapter/lorakit_methods.json                              {"methods": [{"name": "lora", "path": "."},
                                                                           {"name": "prefix", "path": "prefix"}]}

Every part is a complete adapter directory of its method, in PEFT's format where PEFT has the method.
Merging: LoRA, DoRA and IA3 fold into the weights; prefix and prompt tuning and bottleneck adapters are
not weight updates, and `merge_and_unload` refuses them by name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from lorakit.core.active import lora_layers
from lorakit.core.adapters import merge_and_unload as merge_lora
from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_write_text
from lorakit.core.io import CONFIG_NAME, load_adapter, read_config_json
from lorakit.methods import bottleneck, ia3, prefix, prompt_tuning

MANIFEST = "lorakit_methods.json"

# peft_type in adapter_config.json -> how to load that part: (model, directory, is_trainable) -> model
LOADERS: dict[str, Callable[[nn.Module, Path, bool], nn.Module]] = {
    "LORA": lambda model, directory, trainable: load_adapter(model, directory, is_trainable=trainable),
    "IA3": ia3.load,
    "PREFIX_TUNING": prefix.load,
    "PROMPT_TUNING": prompt_tuning.load,
    "BOTTLENECK": bottleneck.load,
}


def apply_methods(methods: list, model: nn.Module, source: str) -> dict[str, list[nn.Parameter]]:
    """Apply `methods` to `model` in order and keep every method's parameters trainable.

    Each method's apply freezes the rest of the model, earlier methods' parameters included: what each
    one left trainable is collected and switched back on at the end.

    Args:
        methods: objects with the `lorakit.methods.Method` shape.
        source: the base model's name or path, recorded in the adapter configs.

    Returns:
        {method name: its trainable parameters}, in order.

    Raises:
        LorakitError: a method's own error, or two methods adapting the same module.
    """
    owned: dict[str, list[nn.Parameter]] = {}
    for method in methods:
        method.apply(model, source)
        seen = {id(p) for params in owned.values() for p in params}
        owned[method.name] = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    for params in owned.values():
        for param in params:
            param.requires_grad_(True)
    _check_disjoint(model)
    return owned


def _check_disjoint(model: nn.Module) -> None:
    # LoRA's "all-linear" finds the linear layer inside an IA3 wrapper: one module would carry both.
    ia3_names = [name for name, _ in ia3.ia3_layers(model)]
    for name, _ in lora_layers(model):
        inside = next((i for i in ia3_names if name.startswith(i + ".")), None)
        if inside is not None:
            raise LorakitError(f"LoRA and IA3 both adapt {inside}; give them disjoint target modules "
                               "(e.g. --target-modules q_proj,o_proj,gate_proj,up_proj with IA3's defaults).")


def save_methods(methods: list, model: nn.Module, directory: str | Path) -> Path:
    """Write what `methods` trained into `directory`: one method's files as they are, several in the
    layout of this module's docstring.

    Returns:
        The directory.
    """
    directory = Path(directory)
    if len(methods) == 1:
        methods[0].save(model, directory)
        return directory
    entries = []
    for i, method in enumerate(methods):
        path = "." if i == 0 else method.name
        method.save(model, directory / path)
        entries.append({"name": method.name, "path": path})
    atomic_write_text(directory / MANIFEST, json.dumps({"methods": entries}, indent=2))
    return directory


def _parts(directory: Path) -> list[Path]:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return [directory]
    try:
        entries = json.loads(manifest.read_text())["methods"]
        return [directory / entry["path"] for entry in entries]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise LorakitError(f"{manifest} is corrupt ({e}); save the adapter again.") from e


def load(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
    """Add the adapter in `directory` to `model`: one method's (LoRA, DoRA, IA3, prefix, prompt,
    bottleneck; written by lorakit or PEFT), or several saved together by `save_methods`.

    Args:
        is_trainable: keep every part's parameters trainable (to continue training); default: all frozen.

    Returns:
        The same model.

    Raises:
        LorakitError: missing/corrupt files, an unknown peft_type, or tensors that do not fit the model.
    """
    trainable: list[nn.Parameter] = []
    for part in _parts(Path(directory)):
        peft_type = read_config_json(part).get("peft_type", "LORA")
        if peft_type not in LOADERS:
            raise LorakitError(f"{part / CONFIG_NAME}: peft_type {peft_type!r} is not one lorakit reads; "
                               f"it reads {', '.join(LOADERS)}.")
        LOADERS[peft_type](model, part, is_trainable)
        trainable += [p for p in model.parameters() if p.requires_grad]  # the next part's load freezes them
    for param in trainable:
        param.requires_grad_(True)
    return model


def base_model_of(directory: str | Path) -> str | None:
    """The base model recorded in an adapter directory (single or combined)."""
    return read_config_json(_parts(Path(directory))[0]).get("base_model_name_or_path")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold LoRA, DoRA and IA3 into the weights and return the plain architecture.

    Raises:
        LorakitError: the model also holds a prefix, a prompt or bottleneck adapters, which no weight can
            absorb (nothing is changed then; lorakit.merge_and_unload or lorakit.methods.ia3.merge_and_unload fold
            just their part and leave the rest as modules), or it holds nothing to merge.
    """
    unmergeable = [what for what, present in (("a prefix (prefix tuning)", prefix.prefix_encoder(model)),
                                              ("a prompt (prompt tuning)", prompt_tuning.prompt_embedding(model)),
                                              ("bottleneck adapters", bottleneck.bottlenecks(model))) if present]
    if unmergeable:
        raise LorakitError(
            f"the model holds {' and '.join(unmergeable)}, which cannot be merged into weights: they add tokens "
            "or nonlinear modules, not weight updates. Keep the model unmerged (lorakit.merge_and_unload and "
            "lorakit.methods.ia3.merge_and_unload fold just the LoRA/IA3 part and leave the rest as modules)."
        )
    has_lora, has_ia3 = bool(list(lora_layers(model))), bool(ia3.ia3_layers(model))
    if not (has_lora or has_ia3):
        raise LorakitError("the model holds no LoRA, DoRA or IA3 adapter to merge.")
    if has_ia3:
        ia3.check_mergeable(model)  # before LoRA merges: a refusal must leave the model unchanged
    if has_lora:
        merge_lora(model)
    if has_ia3:
        ia3.merge_and_unload(model)
    return model
