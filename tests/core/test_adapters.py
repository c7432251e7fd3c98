"""Several adapters on one model: activate, disable, delete, merge/unmerge, merge_and_unload, combine."""
import pytest
import torch
from conftest import randomize_lora, tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.core.layers import LoraLayer

TARGETS = ["q_proj", "v_proj", "up_proj"]


def two_adapter_model():
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "a")
    lorakit.apply(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"]), "b")
    randomize_lora(model)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_set_adapter_and_disable(ids):
    model = two_adapter_model()
    base = logits(tiny_llama(), ids)
    assert lorakit.active_adapters(model) == ["b"]  # the newest adapter is active
    only_b = logits(model, ids)
    lorakit.set_adapter(model, "a")
    only_a = logits(model, ids)
    lorakit.set_adapter(model, ["a", "b"])
    both = logits(model, ids)
    assert not torch.allclose(only_a, only_b)
    assert not torch.allclose(both, only_a)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), base)
    torch.testing.assert_close(logits(model, ids), both)
    with pytest.raises(LorakitError, match="unknown adapter"):
        lorakit.set_adapter(model, "c")


def test_delete_restores_plain_modules(ids):
    model = two_adapter_model()
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a"]
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    lorakit.delete_adapter(model, "a")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids))


def test_model_merge_unmerge_exact(ids):
    model = two_adapter_model()
    lorakit.set_adapter(model, ["a", "b"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)
    model.eval()
    model.train()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), ".eval() must not merge"
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(LorakitError, match="already merged"):
        lorakit.merge(model)
    with pytest.raises(LorakitError, match="unmerge"):
        with lorakit.disable_adapters(model):
            pass
    lorakit.unmerge(model)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_merge_and_unload_gives_plain_model(ids, tmp_path):
    model = two_adapter_model()
    expected = logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)
    # it is a standard transformers model again: save and reload it as such
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_refuses_nan(ids):
    model = two_adapter_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B["b"][0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match="NaN/Inf"):
        lorakit.merge_and_unload(model)
    assert any(isinstance(m, LoraLayer) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("combination", ["linear", "svd"])
def test_add_weighted_adapter(ids, combination):
    model = two_adapter_model()
    w = [0.7, -0.4]
    lorakit.add_weighted_adapter(model, ["a", "b"], w, "mix", combination=combination, svd_rank=6)
    for name, layer in lorakit.lora_layers(model):
        expected = sum(wi * layer.delta_weight(n) for wi, n in zip(w, ["a", "b"]) if n in layer.r)
        got = layer.delta_weight("mix")
        # linear is exact; svd at rank 6 >= the sum's rank (4 + 2) is exact too
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    lorakit.set_adapter(model, "mix")
    base = logits(tiny_llama(), ids)
    assert not torch.allclose(logits(model, ids), base)


def test_svd_combination_truncates():
    model = two_adapter_model()
    lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", combination="svd", svd_rank=1)
    layer = dict(lorakit.lora_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.r["mix"] == 1
    assert torch.linalg.matrix_rank(layer.delta_weight("mix")) == 1


def test_weighted_adapter_bad_input():
    model = two_adapter_model()
    with pytest.raises(LorakitError, match="one weight per adapter"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [1.0], "mix")
    with pytest.raises(LorakitError, match="combination"):
        lorakit.add_weighted_adapter(model, ["a"], [1.0], "mix", combination="ties")
    with pytest.raises(LorakitError, match="already exists"):
        lorakit.add_weighted_adapter(model, ["a"], [1.0], "b")


def test_weighted_adapter_saves_and_loads(ids, tmp_path):
    model = two_adapter_model()
    lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix")
    lorakit.set_adapter(model, "mix")
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path, "mix")
    from peft import PeftModel

    torch.testing.assert_close(logits(lorakit.load_adapter(tiny_llama(), tmp_path), ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), expected,
                               atol=1e-5, rtol=1e-5)


def test_merge_on_model_without_lora():
    with pytest.raises(LorakitError, match="no LoRA layer"):
        lorakit.merge(tiny_llama())
