"""lorakit.apply on transformers models: target matching, rank/alpha patterns, freezing, clear errors."""
import pytest
import torch
from conftest import input_ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig, LorakitError


def adapted_names(model):
    return {name: dict(layer.r) for name, layer in lorakit.lora_layers(model)}


def test_apply_starts_at_base_and_freezes():
    model = tiny_llama()
    ids = input_ids()
    before = model(ids).logits
    lorakit.apply(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(model(ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(adapted_names(model)) == 4


def test_suffix_regex_and_all_linear():
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert set(adapted_names(model)) == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(target_modules="all-linear"))
    names = set(adapted_names(model))
    assert len(names) == 14 and "lm_head" not in names  # 7 linears x 2 blocks, head excluded


def test_exclude_and_layers_to_transform():
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"],
                                    layers_to_transform=[1]))
    names = set(adapted_names(model))
    assert names == {f"model.layers.1.{m}" for m in
                     ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]}


def test_rank_and_alpha_patterns():
    model = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 32})
    lorakit.apply(model, config)
    layers = dict(lorakit.lora_layers(model))
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 4
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == 8.0


def test_gpt2_conv1d_and_embedding():
    model = tiny_gpt2()
    ids = input_ids()
    lorakit.apply(model, LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    layers = dict(lorakit.lora_layers(model))
    assert layers["transformer.h.0.attn.c_attn"].fan_in_fan_out
    randomize_lora(model)
    unmerged = model(ids).logits
    # GPT-2 ties wte to lm_head: merging the embedding's update would change the head too.
    with pytest.raises(LorakitError, match="tied to lm_head"):
        lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, unmerged)
    lorakit.delete_adapter(model, "default")
    lorakit.apply(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_lora(model)
    unmerged = model(ids).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-4)


def test_bias_and_modules_to_save_trainable():
    model = tiny_bert()
    lorakit.apply(model, LoraConfig(target_modules=["query", "value"], bias="lora_only", modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    assert "bert.encoder.layer.0.attention.output.dense.bias" not in trainable


def test_summary_counts():
    model = tiny_gpt2()
    total_before = sum(p.numel() for p in model.parameters())
    lorakit.apply(model, LoraConfig(r=8, target_modules=["c_attn"]))
    s = lorakit.summary(model, print_summary=False)
    expected_lora = 2 * (8 * 32 + 96 * 8)  # 2 blocks x (A: 8x32, B: 96x8)
    assert s.trainable_params == expected_lora
    assert s.total_params == total_before + expected_lora
    assert [m[0] for m in s.modules] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert "trainable params: 2,048" in str(s)


# ---- bad input: a clear LorakitError, and the model unchanged ----------------------------------------
def _unchanged(model, fn):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(LorakitError) as info:
        fn()
    assert [type(m) for m in model.modules()] == modules_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return str(info.value)


def test_targets_matching_nothing_name_closest():
    model = tiny_llama()
    msg = _unchanged(model, lambda: lorakit.apply(model, LoraConfig(target_modules=["qproj"])))
    assert "matched nothing" in msg and "q_proj" in msg


def test_target_of_unsupported_type():
    model = tiny_llama()
    msg = _unchanged(model, lambda: lorakit.apply(model, LoraConfig(target_modules=["input_layernorm"])))
    assert "LlamaRMSNorm" in msg and "cannot adapt" in msg


def test_missing_target_modules_and_duplicate_name():
    model = tiny_llama()
    assert "target_modules is not set" in _unchanged(model, lambda: lorakit.apply(model, LoraConfig()))
    lorakit.apply(model, LoraConfig(target_modules=["q_proj"]))
    _unchanged(model, lambda: lorakit.apply(model, LoraConfig(target_modules=["q_proj"])))


def test_modules_to_save_missing():
    model = tiny_llama()
    msg = _unchanged(model, lambda: lorakit.apply(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["score"])))
    assert "score" in msg


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r=0"), ({"r": -2}, "r=-2"), ({"r": 2.5}, "r=2.5"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_alpha": 0}, "lora_alpha"), ({"bias": "some"}, "bias"), ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
])
def test_invalid_config_values(kwargs, field):
    with pytest.raises(LorakitError, match=field):
        LoraConfig(**kwargs)


def test_unknown_field_names_closest():
    with pytest.raises(LorakitError, match="lora_alpha"):
        LoraConfig.from_dict({"lora_alpah": 8})
