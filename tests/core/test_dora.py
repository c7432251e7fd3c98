"""DoRA: identity at init, PEFT's forward, gradients and files, merging, the norm and its cache, refusals."""
import copy
import re

import pytest
import torch
from conftest import input_ids, tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig, LorakitError, apply
from lorakit.core.dora import DoraLinear

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _dora(kind, **kw):
    base = MAKERS[kind]()
    model = apply(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, **kw))
    return base, model


@torch.no_grad()
def _perturb(model, seed=1):
    # A, B and m all move away from their init, so every part of the math is exercised.
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.add_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_unchanged_at_init_and_peft_agrees_both_ways(kind, tmp_path):
    from peft import PeftModel

    base, model = _dora(kind)
    ids = input_ids()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    _perturb(model)
    ours = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-5, atol=1e-5)
    peft_model.save_pretrained(tmp_path / "b")  # PEFT's own file, read back by lorakit
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "b")
    torch.testing.assert_close(again(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_gradients_match_peft(tmp_path):
    from peft import PeftModel

    base, model = _dora("llama")
    _perturb(model)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ids = input_ids()
    for m in (model, peft_model):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    def key(name):  # ours: q_proj.lora_A.default; PEFT's: base_model.model.(...).q_proj.lora_A.default.weight
        return re.sub(r"\.default|\.weight$", "", name.removeprefix("base_model.model."))

    ours = {key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and any("magnitude" in k for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_merge_unmerge_and_merge_and_unload():
    _, model = _dora("gpt2")
    _perturb(model)
    ids = input_ids()
    expected = model(ids).logits
    weight = model.transformer.h[0].attn.c_attn.base_layer.weight.detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    assert torch.equal(model.transformer.h[0].attn.c_attn.base_layer.weight, weight)
    merged = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, DoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_norm_without_materializing_equals_the_direct_norm():
    _, model = _dora("gpt2")
    _perturb(model)
    layer = model.transformer.h[0].attn.c_attn
    A, B = layer.factors("default")
    direct = torch.linalg.norm(layer.base_layer.weight.T + layer.scaling["default"] * B @ A, dim=1)
    torch.testing.assert_close(layer.weight_norm("default"), direct.detach(), rtol=1e-5, atol=1e-6)


def test_eval_norm_is_cached_and_never_stale(monkeypatch):
    _, model = _dora("llama")
    _perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    calls = []
    original = DoraLinear.weight_norm
    monkeypatch.setattr(DoraLinear, "weight_norm", lambda self, name: calls.append(self) or original(self, name))
    ids = input_ids()
    model.eval()
    first = model(ids).logits
    model(ids)
    assert calls.count(layer) == 1  # the second eval forward reuses the norm
    # A fused optimizer step updates A and B without bumping their versions: train() must drop the cache.
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    after = model(ids).logits
    layer._norm_cache.clear()  # a from-scratch computation of the same forward
    torch.testing.assert_close(model(ids).logits, after, rtol=0, atol=0)
    assert not torch.allclose(after, first)
    with torch.no_grad():  # an in-place change while in eval mode bumps the version
        layer.lora_B["default"].mul_(2)
    before = calls.count(layer)
    model(ids)
    assert calls.count(layer) == before + 1


def test_refusals():
    with pytest.raises(LorakitError, match="pissa"):
        LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights="pissa")
    with pytest.raises(LorakitError, match="linear layers"):
        apply(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    model = apply(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="plain LoRA adapters"):
        apply(model, LoraConfig(target_modules=["q_proj"], use_dora=True), "second")
    model = apply(tiny_llama(), LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="holds DoRA adapters"):
        apply(model, LoraConfig(target_modules=["q_proj"]), "second")


def test_two_active_adapters_match_peft(tmp_path):
    from peft import PeftModel

    base, model = _dora("llama")
    apply(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS["llama"], use_dora=True), "second")
    _perturb(model)
    lorakit.set_adapter(model, ["default", "second"])
    ids = input_ids()
    for name in ("default", "second"):
        lorakit.save_adapter(model, tmp_path / name, name)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default")
    peft_model.load_adapter(tmp_path / "second", "second")
    peft_model.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_dropout_path_equals_the_fused_path_at_p0():
    _, model = _dora("gpt2")  # GPT-2's Conv1D has a bias: the fused path's (1 - g) b term is exercised
    _perturb(model)
    ids = input_ids()
    model.train()
    for module in model.modules():  # GPT-2's own dropout off: both forwards must be deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    fused = model(ids).logits
    for layer in model.modules():
        if isinstance(layer, DoraLinear):
            layer.lora_dropout["default"] = torch.nn.Dropout(0.0)  # not Identity: the per-adapter path runs
    torch.testing.assert_close(model(ids).logits, fused, rtol=1e-5, atol=1e-5)
