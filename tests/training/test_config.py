"""TrainConfig: method options as groups (cfg.lora.r), flags and config.yaml flat as before."""
import re

import pytest

from lorakit import LorakitError
from lorakit.cli.args import parse_config
from lorakit.methods.lora import LoraOptions
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import (
    build_config,
    config_to_yaml,
    config_values,
    load_config,
)


def test_flat_flags_fill_the_groups():
    cfg = parse_config(TrainConfig, ["--r", "4", "--lora-alpha", "32", "--target-modules", "q_proj,v_proj",
                                     "--loraplus-lr-ratio", "16", "--num-virtual-tokens", "5", "--init-r", "6",
                                     "--bottleneck-size", "7", "--ia3-target-modules", "k_proj",
                                     "--method-lr-ratio", '{"prefix": 10}', "--lr", "1e-3"], prog="lorakit train")
    assert cfg.lora == LoraOptions(r=4, lora_alpha=32.0, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16.0)
    assert (cfg.virtual_tokens.num_virtual_tokens, cfg.adalora.init_r, cfg.bottleneck.bottleneck_size) == (5, 6, 7)
    assert cfg.ia3.ia3_target_modules == ["k_proj"] and cfg.method_lr_ratio == {"prefix": 10.0} and cfg.lr == 1e-3


def test_config_yaml_stays_flat_and_reads_back(tmp_path):
    cfg = TrainConfig(method="dora", lora=LoraOptions(r=2, use_rslora=True))
    text = config_to_yaml(cfg)
    assert "\nr: 2\n" in text and "use_rslora: true" in text and not re.search(r"^(lora|adalora|ia3):", text, re.M)
    assert "# LoRA rank." in text, "the flag's help comes from the group's field docstring"
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(TrainConfig, tmp_path / "c.yaml") == cfg
    values = config_values(cfg)
    assert values["r"] == 2 and values["method"] == "dora" and build_config(TrainConfig, values) == cfg
    (tmp_path / "old.yaml").write_text("r: 4\nloraplus_lr_ratio: 16\nmethod_lr_ratio: {ia3: 20, prefix: 20, prompt: 60}\n")
    old = load_config(TrainConfig, tmp_path / "old.yaml")
    assert old.lora.r == 4 and old.lora.loraplus_lr_ratio == 16.0 and old.method_lr_ratio["prompt"] == 60.0


def test_option_errors_name_the_flag():
    with pytest.raises(LorakitError, match="--r must be positive"):
        parse_config(TrainConfig, ["--r", "0"], prog="lorakit train")
    with pytest.raises(LorakitError, match="bottleneck_size"):
        parse_config(TrainConfig, ["--method", "adapter", "--bottleneck-size", "0"], prog="lorakit train")
    with pytest.raises(LorakitError, match="lora_dropout"):
        TrainConfig(lora=LoraOptions(lora_dropout=1.5))  # before any model loads
