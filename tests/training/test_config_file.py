"""lorakit.training.config_file: a config dataclass (option groups flattened) as a YAML file and back."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lorakit.core.errors import LorakitError
from lorakit.methods.lora import LoraOptions
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import (
    build_config,
    config_fields,
    config_to_yaml,
    load_config,
    save_config,
)


@dataclass
class Optim:
    """Optimizer options."""

    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""


@dataclass
class Schedule:
    warmup_steps: int = 10
    """Linear warm-up steps."""
    optim: Optim = field(default_factory=lambda: Optim(lr=5e-4))
    """A group inside a group."""


@dataclass
class Run:
    schedule: Schedule = field(default_factory=Schedule)
    seed: int = 0
    """Random seed."""


def test_fields_are_flat_and_know_their_group():
    fields = config_fields(Run)
    assert list(fields) == ["warmup_steps", "lr", "betas", "seed"]
    assert fields["lr"].group == ("schedule", "optim") and fields["seed"].group == ()
    assert fields["lr"].help == "Peak learning rate." and not fields["lr"].required


def test_build_fills_groups_from_flat_values_and_group_defaults():
    run = build_config(Run, {"lr": 0.1, "seed": 3})
    assert run == Run(Schedule(10, Optim(0.1, [0.9, 0.999])), 3)
    assert build_config(Run, {}).schedule.optim.lr == 5e-4  # the group field's default_factory


def test_nested_groups_round_trip(tmp_path):
    run = Run(Schedule(3, Optim(0.25, [0.5, 0.75])), 7)
    path = tmp_path / "run" / "config.yaml"
    save_config(run, path)
    text = path.read_text()
    assert "# Peak learning rate.\nlr: 0.25\n" in text and "schedule" not in text and "optim:" not in text
    assert load_config(Run, path) == run
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left beside it


def test_train_config_round_trips(tmp_path):
    cfg = TrainConfig(model="m", lora=LoraOptions(r=4, lora_alpha=1e-4, target_modules=["q_proj", "v_proj"]),
                      quantize="nf4", method_lr_ratio={"ia3": 3.0}, epochs=2.5, gradient_checkpointing=True, device=None)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg
    assert config_to_yaml(cfg).count("\n# ") + 1 == len(config_fields(TrainConfig))  # every option documented


def test_load_checks_values_and_post_init(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("warmup_steps: soon\n")
    with pytest.raises(LorakitError, match=r"'warmup_steps' must be an integer, got 'soon'"):
        load_config(Run, path)
    path.write_text("r: 0\n")
    with pytest.raises(LorakitError, match="--r must be positive"):
        load_config(TrainConfig, path)
