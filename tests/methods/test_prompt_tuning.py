"""Prompt tuning: PEFT's files and logits both ways, output length, generation with a cache, training."""
import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_prefix import _padded, greedy_without_cache

from lorakit import LorakitError
from lorakit.methods import prompt_tuning


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_files_and_logits_both_ways(make, tmp_path):
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    base = make()
    ids, mask = _padded()
    P = 3
    peft_model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = prompt_tuning.load(copy.deepcopy(base), tmp_path / "peft")
    logits = ours(input_ids=ids, attention_mask=mask).logits
    assert logits.shape[1] == ids.shape[1]  # PEFT's output has P more positions: the prompt's own
    torch.testing.assert_close(logits, peft_model(input_ids=ids, attention_mask=mask).logits[:, P:], rtol=1e-5, atol=1e-5)

    model = prompt_tuning.apply(copy.deepcopy(base), prompt_tuning.PromptTuningConfig(num_virtual_tokens=P))
    expected = model(input_ids=ids, attention_mask=mask).logits
    prompt_tuning.save(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits[:, P:], expected, rtol=1e-5, atol=1e-5)
    again = prompt_tuning.load(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generation_and_training(make):
    model = prompt_tuning.apply(make(), prompt_tuning.PromptTuningConfig(num_virtual_tokens=3))
    ids, mask = _padded(seed=3)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, greedy_without_cache(model, ids, mask, 5))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [prompt_tuning.prompt_embedding(model).prompt_embeddings]
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert trainable[0].grad.abs().sum() > 0


def test_wrong_width_is_refused(tmp_path):
    prompt_tuning.save(prompt_tuning.apply(tiny_llama(), prompt_tuning.PromptTuningConfig()), tmp_path)
    cfg = tiny_llama().config
    cfg.hidden_size = 48
    from transformers import LlamaForCausalLM

    wider = LlamaForCausalLM(cfg)
    with pytest.raises(LorakitError, match="token_dim=32"):
        prompt_tuning.load(wider, tmp_path)
    assert prompt_tuning.prompt_embedding(wider) is None
