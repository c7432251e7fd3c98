"""lorakit.training.loading: a base model with an adapter directory applied."""
from __future__ import annotations

import torch
from conftest import input_ids, randomize_lora

import lorakit
from lorakit import LoraConfig
from lorakit.training.loading import base_model_for, load_with_adapter
from lorakit.training.models import load_model


def saved_adapter(model_dir, directory):
    """A LoRA adapter with B != 0 on the tiny model, saved with its base recorded; returns the adapted model."""
    model = load_model(str(model_dir), device="cpu").model.float()
    lorakit.apply(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], base_model_name_or_path=str(model_dir)))
    randomize_lora(model)
    lorakit.save_adapter(model, directory)
    return model.eval()


def test_loads_the_recorded_base_with_the_adapter(tiny_model_dir, tmp_path):
    adapted = saved_adapter(tiny_model_dir, tmp_path / "adapter")
    assert base_model_for(None, str(tmp_path / "adapter")) == str(tiny_model_dir)
    assert base_model_for("other", str(tmp_path / "adapter")) == "other" and base_model_for(None, None) is None
    loaded = load_with_adapter(None, str(tmp_path / "adapter"), "cpu", precision="fp32")
    base = load_with_adapter(str(tiny_model_dir), None, "cpu", precision="fp32")
    ids = input_ids(vocab=100)
    with torch.no_grad():
        expected, got, plain = adapted(ids).logits, loaded.model(ids).logits, base.model(ids).logits
    assert (expected - plain).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(got, expected)
