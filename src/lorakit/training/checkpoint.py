"""Training checkpoints that survive a kill at any moment, and resume bit for bit.

Layout of a run's `checkpoints/`:
    step-00000040/                   one complete checkpoint, written as a whole (atomic_directory)
        adapter/                     the adapter as the method saves it (PEFT's format for LoRA)
        trainable.safetensors        every trainable parameter by name: what resume restores
        trainer_state.safetensors    optimizer moments, RNG state
        trainer_state.json           step, scheduler state, last loss
        checksums.json               sha256 of every file above: resume refuses a checkpoint changed since
    latest                           text: the name of the newest complete checkpoint, replaced atomically

Nothing here is pickled: tensors go through safetensors, the rest through JSON.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_directory, atomic_write_text
from lorakit.training.guard import DISK_FULL, disk_full_error

TRAINABLE = "trainable.safetensors"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
CHECKSUMS = "checksums.json"


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
    for stale in directory.glob(".step-*"):  # a write a kill interrupted (the run's lock keeps others out)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with atomic_directory(target) as tmp:
            save_adapter(tmp / "adapter")
            trainable = {k: v.detach().contiguous().clone() for k, v in _trainable(model).items()}
            (tmp / TRAINABLE).write_bytes(save(trainable))
            (tmp / STATE_TENSORS).write_bytes(save(optim_tensors))
            meta = {"step": step, "optimizer": optim_meta, "scheduler": scheduler.state_dict(), **extra}
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2))
            (tmp / CHECKSUMS).write_text(json.dumps(file_checksums(tmp), indent=2, sort_keys=True))
        atomic_write_text(directory / "latest", target.name)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise disk_full_error(e, f"checkpoint {target}", latest_checkpoint(directory)) from e
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def file_checksums(root: Path) -> dict[str, str]:
    """{path relative to root: sha256 hex} of every file under `root` but checksums.json itself."""
    sums = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sums[path.relative_to(root).as_posix()] = digest.hexdigest()
    return sums


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (a file missing, changed or added since it was written), or None.

    A checkpoint written before checksums were recorded is checked for its files only.
    """
    if not (path / STATE_JSON).is_file():
        return f"{STATE_JSON} is missing"
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        missing = [n for n in (TRAINABLE, STATE_TENSORS) if not (path / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    except (OSError, ValueError, RecursionError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    if not isinstance(recorded, dict):
        return f"{CHECKSUMS} is corrupt"
    actual = file_checksums(path)
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            state = "missing" if name not in actual else "not recorded" if name not in recorded else "changed"
            return f"{name} is {state} (sha256 differs from the one recorded when it was written)"
    return None


def resumable_checkpoint(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their recorded checksums, and a note for each one skipped.

    `latest` names the newest complete checkpoint; when it is corrupt (bytes flipped on disk, a file
    deleted), the older ones are tried newest first, so a run never resumes from garbage.
    """
    pointer = directory / "latest"
    named, notes = None, []
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if re.fullmatch(r"step-\d{1,20}", name):
            named = directory / name
        else:
            notes.append(f"{pointer} is corrupt (it names {name[:40]!r}); looking for checkpoints by name.")
    older = sorted((p for p in directory.glob("step-*") if p.is_dir() and p != named), reverse=True)
    for path in ([named] if named is not None else []) + older:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes
        notes.append(f"checkpoint {path} is corrupt: {problem}; skipping it.")
    return None, notes


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
    if not isinstance(meta, dict) or saved.keys() != params.keys() or any(
            saved[k].shape != params[k].shape for k in saved):
        raise LorakitError(
            f"checkpoint {path} was written for other trainable parameters (different method, rank or targets) or "
            "is corrupt; resume with the settings of that run, or use a new --output."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])

    try:  # a checkpoint whose JSON was edited (or whose checksums were rewritten) may hold any shape of data
        restore_trainer_state(meta, tensors, optimizer, scheduler)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise LorakitError(f"checkpoint {path} holds an inconsistent trainer state ({type(e).__name__}: {e}); "
                           "delete it to resume from the previous one.") from e
    return meta


def restore_trainer_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Optimizer moments, scheduler and RNG from a checkpoint's JSON and tensors (as `save_checkpoint` splits them)."""
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
