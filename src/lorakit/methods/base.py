"""The one interface every parameter-efficient method follows, written down.

A method is a class; `lorakit.methods.registry.METHODS` maps its `--method` name to it, and the
peft_type its files carry leads back to it when a directory is loaded. One instance runs one training
run: it is built from the run's config (which holds each method's options dataclass as a group, e.g.
`TrainConfig.lora`), then

    apply(model, source)        adds the method's parts and freezes everything else
    parameter_groups(model)     what trains, in groups with a learning-rate ratio each
    regularizer(model)          an extra loss term per micro-batch (AdaLoRA), or None
    after_step(model, t, T)     after each optimizer step (AdaLoRA's rank schedule)
    save(model, directory)      PEFT's files where PEFT has the method

and, needing no run, on the class:

    load(model, directory, is_trainable)   reads what `save` wrote (and PEFT's files)
    parts(model)                names of the modules the method added or wrapped in `model`
    check_merge(model), merge(model)       fold into the weights, or refuse with LorakitError
    describe(config, shapes)    (label, value) rows that `lorakit info` and report.md show

Nothing outside a method's module names the method: callers go through these members.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.io import load_method_files, save_method_files

Row = tuple[str, Any]
Shapes = dict[str, tuple[int, ...]]
T = TypeVar("T")


@dataclass
class ParameterGroup:
    """Parameters that train at one learning rate: --lr x the method's ratio x `lr_ratio`.

    Args:
        params: the parameters.
        lr_ratio: relative to the method's other groups (LoRA+: B factors at --loraplus-lr-ratio).
        label: what the group holds, e.g. "lora_B".
    """

    params: list[nn.Parameter]
    lr_ratio: float = 1.0
    label: str = ""


def options_from(cfg: Any, kind: type[T]) -> T:
    """The options group of type `kind` in a run config (a dataclass whose fields include one `kind`
    instance), or `cfg` itself when it is a `kind`.

    Raises:
        LorakitError: `cfg` holds no `kind` group.
    """
    if isinstance(cfg, kind):
        return cfg
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        if isinstance(getattr(cfg, f.name), kind):
            return getattr(cfg, f.name)
    raise LorakitError(f"{type(cfg).__name__} has no {kind.__name__} group; pass a config that holds one.")


class Method(ABC):
    """One parameter-efficient method (see the module docstring for the life of an instance).

    Class attributes:
        name: the `--method` name.
        options: its options dataclass, a group of the run config.
        peft_type: adapter_config.json's peft_type of the files `save` writes.
        title: how messages name what it adds to a model, e.g. "a prefix (prefix tuning)".
        lr_ratio: the learning-rate multiplier of all its parameters; --method-lr-ratio overrides it.
        mergeable: whether it folds exactly into the weights.
    """

    name: ClassVar[str]
    options: ClassVar[type]
    peft_type: ClassVar[str]
    title: ClassVar[str]
    lr_ratio: ClassVar[float] = 1.0
    mergeable: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model: nn.Module, source: str) -> None:
        """Add the method's trainable parts to `model` (in place) and freeze the rest of it.

        Args:
            source: the base model's name or path, recorded in the adapter config.
        """

    @abstractmethod
    def parameter_groups(self, model: nn.Module) -> list[ParameterGroup]:
        """The method's trainable parameters in `model`, every one in exactly one group."""

    @abstractmethod
    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained parts to `directory` (PEFT's format where PEFT has the method)."""

    @classmethod
    @abstractmethod
    def load(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
        """Add the adapter saved in `directory` to `model`; raises LorakitError for bad files."""

    @classmethod
    @abstractmethod
    def parts(cls, model: nn.Module) -> list[str]:
        """Names of the modules this method added to `model` or wrapped around its modules."""

    @classmethod
    @abstractmethod
    def describe(cls, config: dict[str, Any], shapes: Shapes) -> list[Row]:
        """(label, value) rows describing a saved adapter, from its adapter_config.json dict and its
        tensors' shapes by key."""

    @classmethod
    def check_merge(cls, model: nn.Module) -> None:
        """Raise LorakitError if `merge` would refuse `model`; changes nothing."""
        if not cls.mergeable:
            raise LorakitError(f"{cls.title} cannot be merged into weights: it adds tokens or nonlinear modules, "
                               "not weight updates. Keep the model unmerged.")

    @classmethod
    def merge(cls, model: nn.Module) -> None:
        """Fold the method's parts into the weights and take them out of `model` (a mergeable method
        overrides this and `check_merge`).

        Raises:
            LorakitError: the method does not merge, or `check_merge` refuses (nothing is changed then).
        """
        cls.check_merge(model)
        raise NotImplementedError(f"{cls.__name__} is mergeable but defines no merge.")

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step (1-based `step`); most methods do nothing."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to each micro-batch's loss, or None."""
        return None


@dataclass(frozen=True)
class ModuleFunctions:
    """What a method module provides over its config dataclass (ia3, bottleneck, prefix, prompt): its
    functions, the class of the modules it adds to a model, and from those its adapter files (`save`, `load`)."""

    read_config: Callable[..., Any]                           # (dict, source=...) -> config
    apply: Callable[[nn.Module, Any], nn.Module]              # (model, config) -> model
    tensors: Callable[[nn.Module], dict[str, torch.Tensor]]   # model -> {file key: tensor}
    remove_parts: Callable[[nn.Module], None]                 # takes the parts and their hooks out again
    part_type: type[nn.Module]
    config_key: str  # where `apply` keeps its config: model.__dict__[config_key]
    missing: str     # the error when `save` finds nothing applied: names how to apply it
    loaded_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. init="random": a file's tensors replace the init

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """Write the model's adapter (config and tensors) to `directory` in PEFT's format.

        Raises:
            LorakitError: the model has no such adapter.
        """
        if self.config_key not in model.__dict__:
            raise LorakitError(self.missing)
        return save_method_files(directory, model.__dict__[self.config_key].to_dict(), self.tensors(model))

    def load(self, model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
        """Add the adapter saved in `directory` (by lorakit or PEFT) to `model`.

        Raises:
            LorakitError: missing/corrupt files or tensors that do not fit the model (the model is then unchanged).
        """
        return load_method_files(model, directory, self.read_config, self._apply_loaded, self.tensors, self.remove,
                                 is_trainable)

    def _apply_loaded(self, model: nn.Module, config: Any) -> nn.Module:
        return self.apply(model, dataclasses.replace(config, **self.loaded_overrides))

    def remove(self, model: nn.Module) -> nn.Module:
        """Take the adapter out again: the model is as it was before `apply`."""
        self.remove_parts(model)
        model.__dict__.pop(self.config_key, None)
        return model


class ModuleMethod(Method):
    """A method that its module implements as functions over a config dataclass (`functions`); the
    trainable parameters are the parts' own (non-recursive) parameters, trained at one rate.

    Class attributes (beyond Method's):
        functions: the module's functions.
        described: the config fields `describe` shows.
    """

    functions: ClassVar[ModuleFunctions]
    described: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: Any) -> None:
        self.config = self.configure(options_from(cfg, self.options))

    @staticmethod
    @abstractmethod
    def configure(options: Any) -> Any:
        """The module's config for these options; raises LorakitError for an invalid value."""

    def apply(self, model: nn.Module, source: str) -> None:
        self.functions.apply(model, dataclasses.replace(self.config, base_model_name_or_path=source))

    def parameter_groups(self, model: nn.Module) -> list[ParameterGroup]:
        parts = [model.get_submodule(name) for name in self.parts(model)]
        return [ParameterGroup([p for part in parts for p in part.parameters(recurse=False)], label=self.name)]

    def save(self, model: nn.Module, directory: Path) -> None:
        self.functions.save(model, directory)

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
        return cls.functions.load(model, directory, is_trainable)

    @classmethod
    def parts(cls, model: nn.Module) -> list[str]:
        return [name for name, module in model.named_modules() if isinstance(module, cls.functions.part_type)]

    @classmethod
    def describe(cls, config: dict[str, Any], shapes: Shapes) -> list[Row]:
        parsed = cls.functions.read_config(config)
        return [(name, getattr(parsed, name)) for name in cls.described]


