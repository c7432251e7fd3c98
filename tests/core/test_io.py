"""Adapter files: PEFT reads what lorakit writes and lorakit reads what PEFT writes, with equal logits."""
import json

import pytest
import torch
from conftest import input_ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, LorakitError

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

# Per architecture: a config exercising rank/alpha patterns, rsLoRA, biases, saved modules and embeddings.
CONFIGS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 4.0}, use_rslora=True),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], bias="lora_only",
                 rank_pattern={"h.0.attn.c_proj": 6}),
    "bert": dict(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], bias="all",
                 modules_to_save=["classifier"], alpha_pattern={"value": 2.0}),
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", list(MODELS))
def test_lorakit_save_loads_in_peft(arch, tmp_path):
    ids = input_ids()
    model = MODELS[arch]()
    lorakit.apply(model, LoraConfig(**CONFIGS[arch]))
    randomize_lora(model)
    if CONFIGS[arch].get("bias", "none") != "none":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.05)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(MODELS[arch](), tmp_path).eval()
    got = logits(peft_model, ids)
    assert (got - logits(MODELS[arch](), ids)).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_save_loads_in_lorakit(arch, tmp_path):
    ids = input_ids()
    peft_model = get_peft_model(MODELS[arch](), PeftLoraConfig(init_lora_weights=False, **CONFIGS[arch])).eval()
    if CONFIGS[arch].get("bias", "none") != "none":
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.05)
    if arch == "bert":
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.mul_(2)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(MODELS[arch](), tmp_path)
    assert (expected - logits(MODELS[arch](), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_save_load_round_trip_and_trainable(tmp_path):
    ids = input_ids()
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path, adapter_name="mine", is_trainable=True)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".mine" in n for n in trainable)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_merged_linear_saves_as_exact_peft_lora(tmp_path):
    """loralib's MergedLinear (LoRA on q and v of a packed qkv) writes an exact rank r*k LoRA."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(lorakit.MergedLinear(8, 24, r=2, lora_alpha=4, enable_lora=[True, False, True]))
    randomize_lora(model)
    x = torch.randn(3, 8)
    expected = model(x)
    lorakit.save_adapter(model, tmp_path)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 24))
    plain.load_state_dict({"0.weight": model[0].weight, "0.bias": model[0].bias})
    got = PeftModel.from_pretrained(plain, tmp_path)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pissa_adapter_saves_against_original_weights(tmp_path):
    ids = input_ids()
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa"))
    with torch.no_grad():  # "training": move the factors away from their start
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)  # onto the ORIGINAL base weights
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-4, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-4, rtol=1e-4)


# ---- bad files: a clear error and the model unchanged ------------------------------------------------
def _saved(tmp_path, **overrides):
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **overrides}))
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def _load_fails(directory, model=None, match=""):
    model = model or tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(LorakitError, match=match):
        lorakit.load_adapter(model, directory)
    assert [type(m) for m in model.modules()] == before
    assert not lorakit.adapter_names(model)


def test_truncated_weights_file(tmp_path):
    d = _saved(tmp_path)
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _load_fails(d, match="truncated or corrupt")


def test_garbage_weights_and_config(tmp_path):
    d = _saved(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    _load_fails(d, match="truncated or corrupt")
    (d / "adapter_config.json").write_text("{not json")
    _load_fails(d, match="not valid JSON")


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    d = _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    _load_fails(d, model=wider, match=r"model\.layers\.0\.self_attn\.q_proj expects lora_A\.weight of shape \(4, 48\) but the file has \(4, 32\)")


def test_missing_files_and_unsupported_peft_feature(tmp_path):
    _load_fails(tmp_path, match="adapter_config.json not found")
    d = _saved(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_bias"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(d, match="lora_bias")


def test_interrupted_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    """A save stopped after writing but before its rename (here: the rename fails) leaves the old files whole."""
    import os

    d = _saved(tmp_path)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    expected = logits(lorakit.load_adapter(tiny_llama(), d), input_ids())
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(model, seed=7)  # other values: a write in place would change the file

    def rename_fails(src, dst):
        raise OSError("interrupted before the rename")

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(OSError, match="interrupted"):
        lorakit.save_adapter(model, d)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files, "the old files are intact, no temp file is left"
    torch.testing.assert_close(logits(lorakit.load_adapter(tiny_llama(), d), input_ids()), expected, atol=0, rtol=0)
