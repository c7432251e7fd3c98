"""Causal-LM loss without materializing the full logits.

The output head (vocab x hidden; 49152 x 576 for SmolLM2) is the largest matmul per token, and its
fp32 logits for a 4 x 256 batch take 200 MB. We compute the head only at positions that carry a
label (instruction data masks the prompt), in chunks, each under activation checkpointing so its
logits are recomputed in backward instead of kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _head_supports_chunking(model: nn.Module) -> bool:
    # Models that post-process logits (soft-capping, scaling) need their own forward.
    config = getattr(model, "config", None)
    special = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return (hasattr(model, "base_model") and callable(getattr(model, "get_output_embeddings", None))
            and model.get_output_embeddings() is not None and not special)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, vocab)
    return F.cross_entropy(logits, labels, reduction="sum")


def loss_sum(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are.

    Args:
        input_ids, attention_mask, labels: (batch, seq); labels are -100 where no loss applies.
        chunk_tokens: how many positions' logits exist at once.
    """
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    n_tokens = int(keep.sum())
    if not _head_supports_chunking(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n_tokens
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = hidden[:, :-1][keep]  # (n_tokens, hidden)
    targets = targets[keep]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total, n_tokens
