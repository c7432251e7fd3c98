"""Prefix tuning: PEFT's files and logits both ways, generation with a cache, training, refusals."""
import copy

import pytest
import torch
from conftest import input_ids, tiny_gpt2, tiny_llama

from lorakit import LorakitError
from lorakit.methods import prefix, prompt_tuning


def _padded(seed=0):
    ids = input_ids(seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as lorakit's batched generation uses
    return ids, mask


def greedy_without_cache(model, ids, mask, n):
    """n greedy tokens, each from a full forward over everything so far (no cache)."""
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_files_and_logits_both_ways(make, tmp_path):
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    base = make()
    ids, mask = _padded()
    peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = prefix.load(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                               peft_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)

    model = prefix.apply(copy.deepcopy(base), prefix.PrefixConfig(num_virtual_tokens=3))
    expected = model(input_ids=ids, attention_mask=mask).logits
    prefix.save(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    again = prefix.load(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generation_with_cache_matches_full_forwards(make):
    model = prefix.apply(make(), prefix.PrefixConfig(num_virtual_tokens=3))
    ids, mask = _padded(seed=3)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, greedy_without_cache(model, ids, mask, 5))
        # the decoder alone (lorakit's chunked loss calls it) sees the prefix too
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids, attention_mask=mask).logits)


def test_only_the_prefix_trains():
    model = prefix.apply(tiny_llama(), prefix.PrefixConfig(num_virtual_tokens=3))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.prefix_tuning.prompt_embeddings"]
    ids = input_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert prefix.prefix_encoder(model).prompt_embeddings.grad.abs().sum() > 0


def test_refusals(tmp_path):
    model = prefix.apply(tiny_llama(), prefix.PrefixConfig(num_virtual_tokens=3))
    with pytest.raises(LorakitError, match="one of them per model"):
        prompt_tuning.apply(model, prompt_tuning.PromptTuningConfig())
    model.gradient_checkpointing_enable()
    model.train()
    ids = input_ids()
    with pytest.raises(LorakitError, match="gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    prefix.save(model, tmp_path)
    gpt2 = tiny_gpt2()
    with pytest.raises(LorakitError, match="the prefix was made for"):
        prefix.load(gpt2, tmp_path)
    assert prefix.prefix_encoder(gpt2) is None
    with pytest.raises(LorakitError, match="num_virtual_tokens"):
        prefix.PrefixConfig(num_virtual_tokens=0)
