"""Parameter-efficient methods that `lorakit train` can run, by name: "lora", and those registered beside it.

A method is anything with the `Method` shape; `METHODS` maps a name to a factory taking the
TrainConfig. "a+b" runs several methods in one model (each applied in turn).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.methods import bottleneck, ia3, prefix, prompt_tuning
from lorakit.methods.adalora import AdaLoraMethod


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


def lora_config(cfg, source: str) -> LoraConfig:
    """The LoraConfig that a run's LoRA options (r, lora_alpha, lora_dropout, target_modules, use_rslora,
    init_lora_weights) describe, for the base model `source`."""
    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        base_model_name_or_path=source, task_type="CAUSAL_LM",
    )


class LoraMethod:
    """LoRA from the TrainConfig (rsLoRA, gaussian/PiSSA init, LoRA+ via the optimizer); `changes` to its
    LoraConfig make the variants ("dora": use_dora=True, "pissa": init_lora_weights="pissa")."""

    def __init__(self, cfg: "RunOptions", name: str = "lora", **changes) -> None:
        self.cfg, self.name, self.changes = cfg, name, changes

    def apply(self, model: nn.Module, source: str) -> None:
        from lorakit.core.inject import apply

        apply(model, lora_config(self.cfg, source).replace(**self.changes))

    def save(self, model: nn.Module, directory: Path) -> None:
        from lorakit.core.io import save_adapter

        save_adapter(model, directory)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        return None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None


METHODS: dict[str, Callable[["RunOptions"], Method]] = {"lora": LoraMethod}


METHODS["adalora"] = AdaLoraMethod


class ModuleMethod:
    """A method that one lorakit module implements with apply(model, config) and save(model, directory):
    ia3, bottleneck, prefix, prompt_tuning."""

    def __init__(self, name: str, module, config) -> None:
        self.name, self.module, self.config = name, module, config

    def apply(self, model: nn.Module, source: str) -> None:
        self.module.apply(model, dataclasses.replace(self.config, base_model_name_or_path=source))

    def save(self, model: nn.Module, directory: Path) -> None:
        self.module.save(model, directory)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        return None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None


METHODS["dora"] = lambda cfg: LoraMethod(cfg, "dora", use_dora=True)
METHODS["pissa"] = lambda cfg: LoraMethod(cfg, "pissa", init_lora_weights="pissa")
METHODS["ia3"] = lambda cfg: ModuleMethod("ia3", ia3, ia3.IA3Config(
    target_modules=cfg.ia3_target_modules or None, feedforward_modules=cfg.ia3_feedforward_modules or None,
    task_type="CAUSAL_LM"))
METHODS["adapter"] = lambda cfg: ModuleMethod("adapter", bottleneck, bottleneck.BottleneckConfig(
    bottleneck_size=cfg.bottleneck_size, placement=cfg.adapter_placement))
METHODS["prefix"] = lambda cfg: ModuleMethod("prefix", prefix, prefix.PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens))
METHODS["prompt"] = lambda cfg: ModuleMethod("prompt", prompt_tuning, prompt_tuning.PromptTuningConfig(
    num_virtual_tokens=cfg.num_virtual_tokens))


def make_methods(cfg: "RunOptions") -> list[Method]:
    """The methods `cfg.method` names ("lora", "dora", "lora+prefix", ...), in order.

    Raises:
        LorakitError: an unknown method name, listing the known ones.
    """
    names = [n.strip() for n in cfg.method.split("+") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise LorakitError(f"unknown method {cfg.method!r}: use one of {', '.join(sorted(METHODS))}, or several joined by '+'.")
    return [METHODS[n](cfg) for n in names]
