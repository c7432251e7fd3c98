"""LoRA as a training method (`--method lora`), and its variants that differ only in their LoraConfig:
DoRA (`--method dora`, use_dora=True) and PiSSA (`--method pissa`, init_lora_weights="pissa").

The layers, files and merging are lorakit.core's (PEFT's LoRA format). LoRA+ (Hayou et al. 2024) is
LoRA's own parameter grouping: the B factors train at --loraplus-lr-ratio times the rate of A.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from lorakit.core.active import lora_layers
from lorakit.core.adapters import check_mergeable, merge_and_unload
from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.inject import apply
from lorakit.core.io import load_adapter, save_adapter
from lorakit.core.layers import LoraLayer
from lorakit.methods.base import Method, ParameterGroup, Row, Shapes, options_from

ADAPTER = "default"


@dataclass
class LoraOptions:
    """LoRA's options (also the targets, scaling and dropout of DoRA, PiSSA and AdaLoRA)."""

    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scaling = lora_alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: comma-separated names (q_proj,v_proj) or all-linear."""
    use_rslora: bool = False
    """Rank-stabilized scaling lora_alpha / sqrt(r)."""
    init_lora_weights: Literal["default", "gaussian", "pissa"] = "default"
    """Initialization of A and B."""
    loraplus_lr_ratio: float = 1.0
    """LoRA+: the learning rate of B is this times that of A (1: plain LoRA; the paper suggests 16)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise LorakitError(f"--r must be positive, got {self.r}.")


def lora_config(options: LoraOptions, source: str | None) -> LoraConfig:
    """The LoraConfig that LoRA options describe, for the base model `source`.

    Raises:
        LorakitError: an invalid value (LoraConfig names the field).
    """
    targets = options.target_modules
    return LoraConfig(
        r=options.r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout, use_rslora=options.use_rslora,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        init_lora_weights=True if options.init_lora_weights == "default" else options.init_lora_weights,
        base_model_name_or_path=source, task_type="CAUSAL_LM",
    )


def lora_groups(layers: list[LoraLayer], loraplus_lr_ratio: float) -> list[ParameterGroup]:
    """The adapter's parameters of `layers`: B factors at `loraplus_lr_ratio`, the rest (A, DoRA's
    magnitudes, AdaLoRA's singular values) at 1."""
    B = [layer.factors(ADAPTER)[1] for layer in layers]
    taken = {id(b) for b in B}
    rest = [p for layer in layers for p in layer.adapter_parameters(ADAPTER) if id(p) not in taken]
    return [ParameterGroup(rest, 1.0, "lora_A"), ParameterGroup(B, loraplus_lr_ratio, "lora_B")]


class LoraMethod(Method):
    """`--method lora`: LoRA from the run's LoraOptions; subclasses change its LoraConfig (`changes`)."""

    name = "lora"
    options = LoraOptions
    peft_type = "LORA"
    title = "LoRA layers"
    mergeable = True
    changes: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any) -> None:
        self.lora = options_from(cfg, LoraOptions)
        self.config = lora_config(self.lora, None).replace(**self.changes)  # invalid values fail now

    def apply(self, model: nn.Module, source: str) -> None:
        apply(model, self.config.replace(base_model_name_or_path=source), ADAPTER)

    def parameter_groups(self, model: nn.Module) -> list[ParameterGroup]:
        layers = [layer for _, layer in lora_layers(model) if ADAPTER in layer.r]
        return lora_groups(layers, self.lora.loraplus_lr_ratio)

    def save(self, model: nn.Module, directory: Path) -> None:
        save_adapter(model, directory, ADAPTER)

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
        return load_adapter(model, directory, adapter_name=ADAPTER, is_trainable=is_trainable)

    @classmethod
    def parts(cls, model: nn.Module) -> list[str]:
        return [name for name, _ in lora_layers(model)]

    # lorakit.core's: refuse NaN/Inf and tied weights; fold every active adapter and unwrap the layers
    check_merge = staticmethod(check_mergeable)
    merge = staticmethod(merge_and_unload)

    @classmethod
    def describe(cls, config: dict[str, Any], shapes: Shapes) -> list[Row]:
        parsed = LoraConfig.from_dict(config)
        # r of each module: the rows of its A (lora_A.weight: r x d_in; an embedding's lora_embedding_A too)
        ranks = [shape[0] for key, shape in shapes.items()
                 if key.endswith(("lora_A.weight", "lora_embedding_A")) and len(shape) >= 2]
        return [("target_modules", parsed.target_modules), ("r", parsed.r), ("lora_alpha", parsed.lora_alpha),
                ("use_rslora", parsed.use_rslora), ("use_dora", parsed.use_dora), ("adapted_modules", len(ranks)),
                ("ranks", sorted(set(ranks)))]


class DoraMethod(LoraMethod):
    """`--method dora`: LoRA with a trained magnitude per output row (lorakit.core.dora)."""

    name = "dora"
    changes = {"use_dora": True}


class PissaMethod(LoraMethod):
    """`--method pissa`: LoRA whose A, B start as the top-r singular part of W."""

    name = "pissa"
    changes = {"init_lora_weights": "pissa"}
