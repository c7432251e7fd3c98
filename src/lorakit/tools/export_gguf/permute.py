"""llama.cpp's row order for the Q and K projections.

Hugging Face's Llama rotates the two halves of each head (dims i and i + d/2 form a pair); llama.cpp's
LLAMA graph rotates adjacent dims (2i, 2i + 1). Its converter therefore reorders the rows of W_q and W_k
head by head, and transformers undoes that when it reads a GGUF file, so every weight lorakit holds is in
the Hugging Face order. Writing GGUF, the rows go back: W_q and W_k when merged, and lora_B of q/k
in an adapter (P (W + B A) = P W + (P B) A, so permuting B's rows is the whole story).
"""
from __future__ import annotations

from typing import Any

import torch


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a (n_head * head_dim, ...) tensor from HF's half-split to llama.cpp's interleaved pairs.

    Args:
        weight: W_q or W_k (out x in), their bias, or lora_B (out x r).
        n_head: the heads this projection has: attention heads for Q, key-value heads for K (GQA).
    """
    rows = weight.shape[0]
    # (heads, 2 halves, head_dim / 2, ...) -> (heads, head_dim / 2, 2, ...): pair i takes row i of each half
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def qk_heads(hf_name: str, config: dict[str, Any]) -> int | None:
    """How many heads to permute `hf_name` by: attention heads for q_proj, key-value heads for k_proj, else None."""
    n_head = config["num_attention_heads"]
    if ".q_proj." in hf_name:
        return n_head
    if ".k_proj." in hf_name:
        return config.get("num_key_value_heads") or n_head
    return None


def to_llama_cpp_rows(hf_name: str, tensor: torch.Tensor, config: dict[str, Any], permute_qk: bool) -> torch.Tensor:
    """`tensor` (a weight, bias or lora_B of module `hf_name`) in llama.cpp's row order."""
    n_head = qk_heads(hf_name, config) if permute_qk else None
    return tensor if n_head is None else permute_rows(tensor, n_head)
