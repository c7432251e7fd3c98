"""The per-machine choice of the LoRA branch's dtype for CPU decoding steps; both paths agree."""
import pytest
import torch
from conftest import input_ids, randomize_lora, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.core import autotune
from lorakit.training.decoding import tune_lora_decoding


@pytest.fixture(autouse=True)
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    autotune.forget_process_decisions()


def test_both_decode_paths_agree_and_the_choice_is_applied():
    model = lorakit.apply(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear")).eval()
    randomize_lora(model, scale=0.3)
    ids = input_ids(batch=1, seq=1)  # one token: the decoding path
    layers = [layer for _, layer in lorakit.lora_layers(model)]
    outputs = {}
    with torch.no_grad():
        for fp32 in (True, False):
            for layer in layers:
                layer.decode_fp32 = fp32
            outputs[fp32] = model(ids).logits.float()
    assert torch.allclose(outputs[True], outputs[False], atol=3e-2, rtol=3e-2)
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(ids).logits.float()
    assert not torch.allclose(outputs[True], base, atol=1e-3)  # B != 0: the branch really ran

    counts = tune_lora_decoding(model)
    assert sum(counts.values()) == len(layers)
    chosen = {k.split("[")[1]: v["choice"] for k, v in autotune.decisions().items() if k.startswith("lora_decode")}
    assert len(chosen) == 4  # q/o 32x32, k/v 32x16, gate/up 32x64, down 64x32: each shape measured once
    assert {layer.decode_fp32 for layer in layers} <= {True, False}
