"""Memory-lean loading for `--shard fsdp`: no process ever holds the whole base.

    load_model(empty=True)     the model built with its parameters on the meta device (no storage)
    apply methods, shard       LoRA factors are added on meta too; fully_shard plans each rank's slices
    load_shards                every rank allocates only its shards (to_empty) and reads its own rows of
                               each weight from the safetensors files (memory-mapped: untouched rows are
                               never read); LoRA factors are initialized from the run's seed, identically
                               on every rank and as an unsharded run initializes them

Plain LoRA loads this way (its initial factors do not depend on the base), over a full-precision or an NF4
base: an NF4 layer is built empty with its packed shape, and each process reads the whole of one weight
at a time, quantizes it, keeps its own rows of the codes and the (small) block scales. DoRA and PiSSA,
whose initialization reads the base weights, and int8 bases load whole and are sharded after.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.core.errors import LorakitError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def loads_lean(method: str, init_lora_weights, quantize: str) -> bool:
    """Whether a --shard fsdp run loads its base shard by shard: plain LoRA with a data-independent init on
    an unquantized or NF4 base."""
    return method == "lora" and init_lora_weights in (True, "gaussian") and quantize in ("none", "nf4")


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (one file, or the shards an index names)."""
    if not any((directory / n).is_file() for n in (WEIGHTS, WEIGHTS_INDEX)):
        raise LorakitError(f"--shard fsdp reads each rank's slices from safetensors files; {directory} has none. "
                           "Re-save the model with save_pretrained (safetensors is its default).")
    if (directory / WEIGHTS_INDEX).is_file():
        index = json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"]
        return {name: directory / file for name, file in index.items()}
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        return {name: directory / WEIGHTS for name in f.keys()}


def checkpoint_name(name: str, files: dict[str, Path]) -> str:
    """The name a model parameter has in the checkpoint files (LoRA wraps the layer as `base_layer`).

    Raises:
        LorakitError: the files do not hold it.
    """
    key = name.replace(".base_layer.", ".")
    if key not in files:
        raise LorakitError(f"the model's weight files have no tensor {key!r}; the directory's config.json and "
                           "weights do not match. Re-save the model with save_pretrained.")
    return key


@torch.no_grad()
def load_shards(model: nn.Module, directory: Path, device: torch.device, seed: int, init_lora_weights) -> None:
    """Give a sharded model built on the meta device its values: each process reads its own rows.

    Every process must call this (the LoRA factors are initialized through a collective gather).
    """
    from safetensors import safe_open

    from lorakit.core.layers import LoraLayer
    from lorakit.core.quantize import fill_nf4_layer, is_nf4_layer
    from lorakit.training.sharding import full_trainable

    buffers = {name: b.clone() for name, b in model.named_buffers()}   # real already; to_empty would wipe them
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    files = weight_files(directory)
    handles: dict[Path, object] = {}
    for owner, name, param in frozen_parameters(model):
        key = checkpoint_name(name, files)
        if files[key] not in handles:
            handles[files[key]] = safe_open(str(files[key]), framework="pt")
        local = param.to_local() if hasattr(param, "to_local") else param
        if is_nf4_layer(owner) and name.endswith(".weight"):  # one whole weight, quantized, then our rows
            full = handles[files[key]].get_tensor(key).to(device=device, dtype=owner.compute_dtype)
            local.copy_(rows(fill_nf4_layer(owner, full), param, local))
            del full
        else:
            local.copy_(rows(handles[files[key]].get_slice(key), param, local))
    # The same seed and the same layer order as apply() on an unsharded model: the same factors.
    torch.manual_seed(seed)
    with full_trainable(model):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.adapter_names():
                    module.init_factors(name, init_lora_weights)


def frozen_parameters(model: nn.Module):
    """(owning module, full name, parameter) of every frozen parameter, a tied one once (under its first name,
    as `named_parameters` gives it)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                yield module, f"{module_name}.{name}" if module_name else name, param


def rows(view, param, local: torch.Tensor) -> torch.Tensor:
    """This process's rows of a checkpoint tensor (FSDP shards dim 0 as torch.chunk does)."""
    if local.shape == tuple(param.shape):
        return view[:]
    mesh = param.device_mesh
    full = param.shape[0]
    per = -(-full // mesh.size())
    start = min(mesh.get_local_rank() * per, full)
    return view[start:start + local.shape[0]]
