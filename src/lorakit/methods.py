"""Parameter-efficient methods that `lorakit train` can run, by name: "lora", and those registered beside it.

A method is anything with the `Method` shape; `METHODS` maps a name to a factory taking the
TrainConfig. "a+b" runs several methods in one model (each applied in turn).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from .errors import LorakitError

if TYPE_CHECKING:
    from .train import TrainConfig


class Method(Protocol):
    """One parameter-efficient method as the training loop sees it."""

    name: str

    def apply(self, model: nn.Module, source: str) -> None:
        """Add the method's trainable parts to `model` (in place) and freeze the rest of it."""

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained parts to `directory` (PEFT's format where PEFT has the method)."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step (rank schedules, pruning); most methods do nothing."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to each micro-batch's loss, or None."""


class LoraMethod:
    """Plain LoRA (with rsLoRA, PiSSA/gaussian init, LoRA+ via the optimizer)."""

    name = "lora"

    def __init__(self, cfg: "TrainConfig") -> None:
        self.cfg = cfg

    def apply(self, model: nn.Module, source: str) -> None:
        from .inject import apply
        from .train import lora_config

        apply(model, lora_config(self.cfg, source))

    def save(self, model: nn.Module, directory: Path) -> None:
        from .io import save_adapter

        save_adapter(model, directory)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        return None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None


METHODS: dict[str, Callable[["TrainConfig"], Method]] = {"lora": LoraMethod}


def make_methods(cfg: "TrainConfig") -> list[Method]:
    """The methods `cfg.method` names ("lora", "dora", "lora+prefix", ...), in order.

    Raises:
        LorakitError: an unknown method name, listing the known ones.
    """
    names = [n.strip() for n in cfg.method.split("+") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise LorakitError(f"unknown method {cfg.method!r}: use one of {', '.join(sorted(METHODS))}, or several joined by '+'.")
    return [METHODS[n](cfg) for n in names]
