"""Several parameter-efficient methods in one model and one adapter directory.

Directory layout, PEFT's own for several adapters: the first method's files at the root, each later
method's in a subdirectory named after it, and `lorakit_methods.json` listing them in order:

    adapter/adapter_config.json, adapter_model.safetensors    e.g. LoRA (PEFT loads this part from here)
    adapter/prefix/adapter_config.json, ...                   the prefix (PEFT loads it with subfolder="prefix")
    adapter/lorakit_methods.json                              {"methods": [{"name": "lora", "path": "."},
                                                                           {"name": "prefix", "path": "prefix"}]}

Every part is a complete adapter directory of its method, in PEFT's format where PEFT has the method.
Merging folds the methods that are weight updates (`Method.mergeable`) and refuses a model that also
holds one that is not.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_write_text
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_tensors, read_config_json
from lorakit.methods.base import Method, Row, Shapes
from lorakit.methods.registry import LOADERS, loader_for

MANIFEST = "lorakit_methods.json"


def apply_methods(methods: list[Method], model: nn.Module, source: str) -> None:
    """Apply `methods` to `model` in order and keep every method's parameters trainable.

    Each method's apply freezes the rest of the model, earlier methods' parameters included: each
    method's parameter groups are switched back on at the end.

    Args:
        methods: `lorakit.methods.base.Method` instances.
        source: the base model's name or path, recorded in the adapter configs.

    Raises:
        LorakitError: a method's own error, or two methods adapting the same module.
    """
    for method in methods:
        method.apply(model, source)
    for method in methods:
        for group in method.parameter_groups(model):
            for param in group.params:
                param.requires_grad_(True)
    _check_disjoint(model, methods)


def _check_disjoint(model: nn.Module, methods: list[Method]) -> None:
    # A method wrapping a module another one wrapped (LoRA's "all-linear" finds the linear layer inside an
    # IA3 wrapper) would put both on one module.
    owned = [(type(m), name) for m in methods for name in dict.fromkeys(type(m).parts(model))]
    for kind, name in owned:
        outer = next(((k, o) for k, o in owned if k is not kind and (name == o or name.startswith(o + "."))), None)
        if outer is not None:
            raise LorakitError(f"{kind.title} and {outer[0].title} both adapt {outer[1]}; "
                               "give the methods disjoint target modules.")


def save_methods(methods: list[Method], model: nn.Module, directory: str | Path) -> Path:
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


def parts_of(directory: str | Path) -> list[tuple[str, Path]]:
    """(method name, directory) of each part of an adapter directory: itself (named after the method that
    reads it) or, for several methods, the parts its manifest lists.

    Raises:
        LorakitError: a corrupt manifest, or a missing/corrupt adapter_config.json.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return [(loader_for(read_config_json(directory), str(directory)).name, directory)]
    try:
        entries = json.loads(manifest.read_text())["methods"]
        return [(entry["name"], directory / entry["path"]) for entry in entries]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise LorakitError(f"{manifest} is corrupt ({e}); save the adapter again.") from e


def load(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
    """Add the adapter in `directory` to `model`: one method's (any in lorakit.methods.registry; written
    by lorakit or PEFT), or several saved together by `save_methods`.

    Args:
        is_trainable: keep every part's parameters trainable (to continue training); default: all frozen.

    Returns:
        The same model.

    Raises:
        LorakitError: missing/corrupt files, an unknown peft_type, or tensors that do not fit the model.
    """
    trainable: list[nn.Parameter] = []
    for _, part in parts_of(directory):
        loader_for(read_config_json(part), str(part)).load(model, part, is_trainable)
        trainable += [p for p in model.parameters() if p.requires_grad]  # the next part's load freezes them
    for param in trainable:
        param.requires_grad_(True)
    return model


def base_model_of(directory: str | Path) -> str | None:
    """The base model recorded in an adapter directory (single or combined)."""
    return read_config_json(parts_of(directory)[0][1]).get("base_model_name_or_path")


def _read_part(part: Path) -> tuple[type[Method], dict, Shapes]:
    config = read_config_json(part)
    shapes = {key: tuple(t.shape) for key, t in read_adapter_tensors(part).items()}
    return loader_for(config, str(part)), config, shapes


def describe_methods(directory: str | Path) -> list[tuple[str, list[Row]]]:
    """(method name, its `describe` rows) for each part of an adapter directory.

    Raises:
        LorakitError: missing/corrupt files or an unknown peft_type.
    """
    described = []
    for name, part in parts_of(directory):
        kind, config, shapes = _read_part(part)
        described.append((name, kind.describe(config, shapes)))
    return described


def describe_adapter(directory: str | Path) -> list[Row]:
    """What `lorakit info` shows for an adapter directory of any method or several: the base model, each
    part's peft_type and `describe` rows (prefixed "name." when there are several), the parameter
    count and the size of the files.

    Raises:
        LorakitError: missing/corrupt files or an unknown peft_type.
    """
    directory = Path(directory)
    parts = parts_of(directory)
    rows: list[Row] = [("base_model", base_model_of(directory))]
    if len(parts) > 1:
        rows.append(("methods", "+".join(name for name, _ in parts)))
    n_params, n_bytes = 0, (directory / MANIFEST).stat().st_size if len(parts) > 1 else 0
    for name, part in parts:
        kind, config, shapes = _read_part(part)
        label = f"{name}." if len(parts) > 1 else ""
        rows += [(label + key, value) for key, value in [("peft_type", kind.peft_type), *kind.describe(config, shapes)]]
        n_params += sum(math.prod(shape) for shape in shapes.values())
        n_bytes += (part / WEIGHTS_NAME).stat().st_size + (part / CONFIG_NAME).stat().st_size
    return rows + [("parameters", n_params), ("file_bytes", n_bytes)]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every method in `model` that is a weight update (LoRA, DoRA, AdaLoRA, IA3) into the weights
    and return the plain architecture.

    Raises:
        LorakitError: the model also holds a method that no weight can absorb (a prefix, a prompt,
            bottleneck adapters), a mergeable part refuses (NaN/Inf, a quantized or tied weight), or
            the model holds nothing to merge; nothing is changed then.
    """
    present = [kind for kind in LOADERS.values() if kind.parts(model)]
    refused = [kind.title for kind in present if not kind.mergeable]
    if refused:
        raise LorakitError(
            f"the model holds {' and '.join(refused)}, which cannot be merged into weights: they add tokens "
            "or nonlinear modules, not weight updates. Keep the model unmerged, or merge just the other "
            "parts with their own merge (e.g. lorakit.merge_and_unload for LoRA)."
        )
    if not present:
        mergeable = [kind.title for kind in LOADERS.values() if kind.mergeable]
        raise LorakitError(f"the model holds nothing to merge (no {' or '.join(mergeable)}).")
    for kind in present:  # every check before any merge: a refusal leaves the model unchanged
        kind.check_merge(model)
    for kind in present:
        kind.merge(model)
    return model
