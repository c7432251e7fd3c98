"""Tiny models built from transformers configs (no downloads), and helpers that make LoRA updates non-zero."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@torch.no_grad()
def randomize_lora(model, seed: int = 1, scale: float = 0.1) -> None:
    """Give every LoRA factor (and saved module) random values, so B != 0 and checks can fail."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.copy_(torch.randn(param.shape, generator=g) * scale)


def input_ids(batch: int = 2, seq: int = 12, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids():
    return input_ids()
