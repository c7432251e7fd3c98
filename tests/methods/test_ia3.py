"""IA3: identity at init, PEFT's files both ways, exact merge, save -> load, refusals."""
import copy

import pytest
import torch
from conftest import input_ids, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, LorakitError, apply
from lorakit.methods import ia3


@torch.no_grad()
def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, layer in ia3.ia3_layers(model):
        layer.ia3_l.add_(torch.randn(layer.ia3_l.shape, generator=g) * 0.2)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identity_at_init_and_peft_files_both_ways(make, tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import PeftModel, get_peft_model

    base = make()
    ids = input_ids()
    model = ia3.apply(copy.deepcopy(base), ia3.IA3Config())
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.ia3_l" for n, _ in ia3.ia3_layers(model)]
    _perturb(model)
    ours = model(ids).logits
    ia3.save(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-6, atol=1e-6)

    peft_model = get_peft_model(copy.deepcopy(base), PeftIA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = ia3.load(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_equivalence_and_reload(make, tmp_path):
    model = ia3.apply(make(), ia3.IA3Config())
    _perturb(model)
    ids = input_ids()
    expected = model(ids).logits
    ia3.save(model, tmp_path)
    reloaded = ia3.load(make(), tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    merged = ia3.merge_and_unload(reloaded)
    assert not ia3.ia3_layers(merged)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
    model = apply(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(LorakitError, match="disjoint target modules"):
        ia3.apply(model, ia3.IA3Config())
    with pytest.raises(LorakitError, match="no default target modules"):
        ia3.apply(nn.Sequential(nn.Linear(4, 4)), ia3.IA3Config())
    with pytest.raises(LorakitError, match="feedforward_modules"):
        ia3.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    ia3.save(ia3.apply(tiny_gpt2(), ia3.IA3Config()), tmp_path)
    llama = tiny_llama()
    with pytest.raises(LorakitError, match="matched no module"):
        ia3.load(llama, tmp_path)
    assert not ia3.ia3_layers(llama)
