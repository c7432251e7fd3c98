"""Causal-LM loss without materializing the full logits.

The output head (vocab x hidden; 49152 x 576 for SmolLM2) is the largest matmul per token, and its
fp32 logits for a 4 x 256 batch take 200 MB (twice that with the softmax kept for backward). Two savings:
- the head runs only at positions that carry a label (instruction data masks the prompt);
- `LinearCrossEntropy` computes the loss chunk by chunk and, in the same pass, the gradient with
  respect to the hidden states (softmax - onehot) @ W: the cross-entropy is the end of the graph, so
  nothing is kept for backward but that (tokens x hidden) gradient, and nothing is recomputed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of a position with no loss (torch's cross_entropy default, HF's convention)
# Positions whose logits exist at once. 128 x 49152 fp32 logits are 25 MB: below glibc's largest mmap
# threshold, so the buffer is reused from the heap rather than mapped and page-faulted afresh each step
# (1024 positions, 200 MB: ~3% slower steps and ~0.2 GB more peak memory on the default model).
CHUNK_TOKENS = 128
# The sizes `choose_chunk` measures on CPU (the first is the default where nothing is measured).
CHUNK_CANDIDATES = (CHUNK_TOKENS, 64, 256, 512)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i), chunked over tokens, with gradients computed in forward.

    Shapes: hidden (n, d), weight (V, d), targets (n,). Returns a 0-dim fp32 tensor.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # One (c, V) buffer per dtype, reused by every chunk: a fresh one per chunk (above glibc's mmap
        # threshold at 256 positions) would be fresh pages, faulted in each time.
        width = min(chunk, hidden.shape[0])
        scores = hidden.new_empty(width, weight.shape[0])  # the head's product, in the compute dtype
        fp32 = scores if scores.dtype == torch.float32 else scores.new_empty(scores.shape, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            low, logits = scores[:h.shape[0]], fp32[:h.shape[0]]
            torch.mm(h, weight.T, out=low)
            if logits is not low:
                logits.copy_(low)
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            # logsumexp and softmax in place over the one fp32 buffer (torch.logsumexp would allocate another
            # for logits - max and exponentiate twice)
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()  # exp(logits - max)
            sums = exps.sum(dim=-1, keepdim=True)
            total += (sums.log() + row_max - target_logit[:, None]).sum()
            if need_h or need_w:
                # d loss / d logits = softmax - onehot, over the same buffer, then cast into the low one
                grad_logits = exps.div_(sums)
                grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1
                if grad_logits is not low:
                    grad_logits = low.copy_(grad_logits)
                if need_h:
                    torch.mm(grad_logits, weight, out=grad_h[start:start + chunk])
                if need_w:
                    grad_w += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_output.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * grad_output).to(ctx.weight_dtype) if grad_w is not None else None,
            None,
            None,
        )


def _head_supports_fusion(model: nn.Module) -> bool:
    # Models that post-process logits (soft-capping, scaling) or whose head has a bias use their forward.
    config = getattr(model, "config", None)
    special = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    # A sharded (FSDP) model gathers its weights in hooks that run only when the model itself is called.
    sharded = type(model).__name__.startswith("FSDP")
    return (not sharded and hasattr(model, "base_model") and isinstance(head, nn.Linear) and head.bias is None and not special)


def no_cache_kwargs(model: nn.Module) -> dict:
    """{"use_cache": False} for a Hugging Face model: a training forward would otherwise build a generation
    KV cache nobody reads (whose per-layer state also makes torch.compile recompile each decoder layer)."""
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def loss_sum(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are.

    Args:
        input_ids, attention_mask, labels: (batch, seq); labels are IGNORE_INDEX where no loss applies.
        chunk_tokens: how many positions' logits exist at once; None: CHUNK_TOKENS on GPUs, and on CPUs
            the size this machine runs fastest (`choose_chunk`, measured once).
    """
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    n_tokens = int(keep.sum())
    no_cache = no_cache_kwargs(model)
    if not _head_supports_fusion(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **no_cache).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n_tokens
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **no_cache).last_hidden_state
    hidden = hidden[:, :-1][keep]  # (n_tokens, hidden)
    weight = model.get_output_embeddings().weight
    chunk = chunk_tokens or (choose_chunk(weight) if weight.device.type == "cpu" else CHUNK_TOKENS)
    return LinearCrossEntropy.apply(hidden, weight, targets[keep], chunk), n_tokens


def choose_chunk(weight: torch.Tensor, tokens: int = 512) -> int:
    """The fastest of CHUNK_CANDIDATES for the fused loss (forward and its in-pass gradient) over `tokens`
    positions with this output head's shape and dtype, measured once per machine (`lorakit.core.autotune`)."""
    from lorakit.core.autotune import choose

    vocab, dim = weight.shape

    @functools.cache
    def inputs():  # built only if this machine has not measured yet: a head-sized randn costs ~0.1 s a step
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, dim, generator=g).to(weight.dtype).requires_grad_()
        return hidden, torch.randn(vocab, dim, generator=g).to(weight.dtype), torch.randint(0, vocab, (tokens,), generator=g)

    def run(chunk: int):
        def step():
            with torch.enable_grad():  # the first call may come from an evaluation under no_grad
                LinearCrossEntropy.apply(*inputs(), chunk).backward()
        return step

    shapes = f"V{vocab} d{dim} {str(weight.dtype).replace('torch.', '')}"
    return int(choose("loss_chunk", shapes, {str(c): run(c) for c in CHUNK_CANDIDATES}, repeats=3))
