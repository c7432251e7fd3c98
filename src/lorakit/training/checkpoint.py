"""Training checkpoints that survive a kill at any moment, and resume bit for bit.

Layout of a run's `checkpoints/`:
    step-00000040/                   one complete checkpoint, written as a whole (atomic_directory)
        adapter/                     the adapter as the method saves it (PEFT's format for LoRA)
        trainable.safetensors        every trainable parameter by name: what resume restores
        trainer_state.safetensors    optimizer moments, RNG state
        trainer_state.json           step, scheduler state, last loss
    latest                           text: the name of the newest complete checkpoint, replaced atomically

Nothing here is pickled: tensors go through safetensors, the rest through JSON.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_directory, atomic_write_text

TRAINABLE = "trainable.safetensors"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (by "<param index>.<name>") and JSON-able values."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path, step: int, model: nn.Module, save_adapter: Callable[[Path], None],
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any], keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `directory`, then point `latest` at it; keep the newest `keep`.

    Args:
        save_adapter: writes the method's adapter files into the directory it is given.
    """
    from safetensors.torch import save

    target = directory / f"step-{step:08d}"
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    optim_tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        optim_tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_directory(target) as tmp:
        save_adapter(tmp / "adapter")
        trainable = {k: v.detach().contiguous().clone() for k, v in _trainable(model).items()}
        (tmp / TRAINABLE).write_bytes(save(trainable))
        (tmp / STATE_TENSORS).write_bytes(save(optim_tensors))
        meta = {"step": step, "optimizer": optim_meta, "scheduler": scheduler.state_dict(), **extra}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2))
    atomic_write_text(directory / "latest", target.name)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if (path / STATE_JSON).is_file() else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore trainable parameters, optimizer, scheduler and RNG from checkpoint `path`.

    Returns:
        The checkpoint's JSON state (step, loss, ...).

    Raises:
        LorakitError: unreadable files, or parameters that do not match the model being trained.
    """
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
        saved = load_file(str(path / TRAINABLE))
    except Exception as e:
        raise LorakitError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the previous one.") from e
    params = _trainable(model)
    if saved.keys() != params.keys() or any(saved[k].shape != params[k].shape for k in saved):
        raise LorakitError(
            f"checkpoint {path} was written for other trainable parameters (different method, rank or targets); "
            "resume with the settings of that run, or use a new --output."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])

    state = optimizer.state_dict()
    new_state: dict[int, dict[str, Any]] = {}
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        new_state.setdefault(int(index), {})[name] = value
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            new_state.setdefault(int(index), {})[name] = value
    state["state"] = new_state
    state["param_groups"] = meta["optimizer"]["param_groups"]
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
