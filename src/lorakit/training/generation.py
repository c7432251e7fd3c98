"""Greedy generation for evaluation and probes: batched with left padding, stopping at end-of-turn."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos plus the chat template's end-of-turn token, whichever exist."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_ids(
    model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
    max_new_tokens: int = 64, batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations of already-rendered prompts as token ids, batched with left padding.

    Each continuation ends at its first stop token (kept) or after `max_new_tokens`; padding is dropped.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer)
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
            outputs += [until_stop(row.tolist(), stops) for row in out[:, enc["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """`ids` up to and including the first stop token (all of them if none)."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i + 1]
    return ids


def generate(
    model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
    max_new_tokens: int = 64, batch_size: int = 32,
) -> list[str]:
    """Greedy completions of already-rendered prompts as text, batched with left padding."""
    ids = generate_ids(model, tokenizer, prompts, device, max_new_tokens, batch_size)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
