"""The behaviour probe, the preservation loss (--preserve) and the forgetting guard (--max-forgetting)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import input_ids, randomize_lora, tiny_llama

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.training.general_prompts import GENERAL_INSTRUCTIONS
from lorakit.training.knowledge import (
    ForgettingGuard,
    PreservationLoss,
    behaviour_answers,
    compare_behaviour,
    kl_to_base,
    load_trainable_state,
    chat_preservation_pieces,
    preservation_texts,
    render_instruction,
    token_agreement,
    trainable_state,
)
from lorakit.training.generation import generate_ids
from lorakit.training.preserve_prompts import preservation_instructions
from lorakit.training.tasks import forgetting_probe_texts
from lorakit.training.ticket_task import LABELS, ticket_task


def adapted_pair():
    base = tiny_llama().float()
    model = lorakit.apply(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, scale=0.3)
    return base, model


def test_kl_gradient_matches_two_model_copies():
    base, model = adapted_pair()
    ids = input_ids(batch=2, seq=10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row: its padded positions must not count

    kl = kl_to_base(model, ids, mask)
    kl.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    with torch.no_grad():
        p_base = F.softmax(base(input_ids=ids, attention_mask=mask).logits, dim=-1)
    logq = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
    per_token = F.kl_div(logq, p_base, reduction="none").sum(-1)
    plain = (per_token * mask).sum() / mask.sum()
    plain.backward()

    assert kl.item() > 1e-4  # B != 0: the adapted model really differs from its base
    assert torch.allclose(kl, plain, rtol=1e-5, atol=1e-7)
    assert ours  # gradients reach the LoRA factors
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(ours[name], param.grad, rtol=1e-4, atol=1e-7), name


def test_kl_is_zero_at_the_base_and_adapters_come_back_on():
    base, model = adapted_pair()
    ids = input_ids()
    before = model(input_ids=ids).logits
    kl_to_base(model, ids, torch.ones_like(ids))
    assert torch.equal(model(input_ids=ids).logits, before)  # adapters switched back on
    with lorakit.disable_adapters(model):
        assert kl_to_base(model, ids, torch.ones_like(ids)).item() == pytest.approx(0.0, abs=1e-7)


def test_preservation_text_is_not_the_probe_text(smollm_tokenizer):
    probe, preserve = set(forgetting_probe_texts()), preservation_texts()
    assert len(preserve) > 50 and not probe & set(preserve)
    instructions = preservation_instructions()
    assert len(set(instructions)) == len(instructions) >= 90 and not set(instructions) & set(GENERAL_INSTRUCTIONS)
    chat = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    loss = PreservationLoss(smollm_tokenizer, weight=0.5, chat_pieces=chat, prose_rows=1, chat_rows=2)
    ids, mask = loss.batch(1, torch.device("cpu"))
    assert ids.shape[0] == 3 and mask[0].sum() > 4  # one prose piece, then two answers
    assert ids[1, :2].tolist() == [8, 9] and ids[2, :4].tolist() == [1, 2, 3, 4]  # step 1: answers 2 and 0
    assert mask[1].sum() == 2 and mask[2].sum() == 4
    assert torch.equal(loss.batch(1, torch.device("cpu"))[0], ids)  # a resumed run sees the same batch
    with pytest.raises(LorakitError, match="--preserve"):
        PreservationLoss(smollm_tokenizer, weight=-1)


def test_chat_preservation_answers_are_the_bases(tiny_model_dir, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    model = lorakit.apply(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, scale=0.5)
    pieces = chat_preservation_pieces(model, smollm_tokenizer, torch.device("cpu"), max_new_tokens=6)
    prompts = [render_instruction(smollm_tokenizer, q) for q in preservation_instructions()]
    assert len(pieces) == len(prompts)
    expected = generate_ids(base, smollm_tokenizer, prompts[:8], torch.device("cpu"), max_new_tokens=6)
    adapted = generate_ids(model, smollm_tokenizer, prompts[:8], torch.device("cpu"), max_new_tokens=6)
    assert expected != adapted  # B != 0: the adapted model answers differently, so the check can fail
    for prompt, piece, answer in zip(prompts, pieces, expected):
        prompt_ids = smollm_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert piece == prompt_ids + answer and 1 <= len(answer) <= 6
    assert model(input_ids=input_ids()).logits.requires_grad  # adapters back on after the answers


def test_guard_keeps_the_best_task_loss_within_budget():
    guard = ForgettingGuard(max_forgetting_pct=5.0, baseline_perplexity=50.0)
    states = {}
    run = [(10, 50.5, 1.0), (20, 51.5, 0.5), (30, 52.4, 0.3), (40, 53.0, 0.2), (50, 56.0, 0.1)]
    for step, ppl, loss in run:
        states[step] = {"w": torch.tensor([float(step)])}
        guard.observe(step, ppl, loss, snapshot=lambda s=step: states[s])
    loaded = {}
    message = guard.restore(loaded.update)
    # step 40 forgot 6% and step 50 12%: step 30 (4.8%) has the best loss within 5%
    assert guard.best.step == 30 and loaded["w"].item() == 30.0
    assert "step 30" in message and "over 5%" in message


def test_guard_keeps_the_final_adapter_when_it_is_best():
    guard = ForgettingGuard(5.0, 50.0)
    for step, loss in ((1, 1.0), (2, 0.5)):
        guard.observe(step, 50.0, loss, snapshot=lambda: {})
    loaded = {}
    assert "final adapter (step 2)" in guard.restore(loaded.update) and not loaded


def test_guard_with_nothing_within_budget_says_so():
    guard = ForgettingGuard(1.0, 50.0)
    guard.observe(1, 60.0, 0.1, snapshot=lambda: {})
    assert "no probe point" in guard.restore(lambda s: None)
    with pytest.raises(LorakitError):
        ForgettingGuard(0, 50.0)


def test_trainable_state_round_trip():
    _, model = adapted_pair()
    state = trainable_state(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_trainable_state(model, state)
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_compare_behaviour(smollm_tokenizer):
    before = ["Paris.", "56", "A sunny day is warm."]
    after = ["Paris.", "54", "A sunny day is warm."]
    kept = compare_behaviour(before, after, smollm_tokenizer)
    assert kept.unchanged == pytest.approx(2 / 3)
    assert 2 / 3 < kept.token_agreement < 1
    assert kept.examples[0][1:] == ("56", "54")  # changed answers are shown first
    assert token_agreement([1, 2, 3], [1, 2]) == pytest.approx(2 / 3) and token_agreement([], []) == 1.0
    with pytest.raises(LorakitError):
        compare_behaviour(before, after[:2], smollm_tokenizer)


def test_behaviour_answers_on_a_tiny_model(tiny_model_dir, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    answers = behaviour_answers(model, smollm_tokenizer, torch.device("cpu"), max_new_tokens=4)
    assert len(answers) == len(GENERAL_INSTRUCTIONS) >= 50
    assert compare_behaviour(answers, answers, smollm_tokenizer).unchanged == 1.0


def test_ticket_task():
    train, held_out = ticket_task(n_train=300, n_eval=50, seed=0)
    assert (train, held_out) == ticket_task(n_train=300, n_eval=50, seed=0)
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    assert {r["output"] for r in train} == set(LABELS)
    with pytest.raises(LorakitError):
        ticket_task(n_train=-1)
