"""Shared builders for the serving tests: a tiny Llama with SmolLM2's tokenizer, adapters of several kinds
written by lorakit and by PEFT (B != 0), and the reference generations they must reproduce."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import lorakit
from conftest import randomize_lora

# name -> (writer, config): different ranks side by side, per-module rank/alpha, rsLoRA, DoRA
ADAPTERS = {
    "r4": ("lorakit", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "r8dora": ("lorakit", dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True)),
    "patterns": ("lorakit", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                                 rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 3})),
    "peft": ("peft", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj", "o_proj"], use_dora=True,
                          rank_pattern={"k_proj": 2}, alpha_pattern={"gate_proj": 5}, use_rslora=True)),
}


def tiny(kind: str, **overrides):
    """A random 2-layer Llama, Qwen2 or Mistral from its config (seed 0): 4 query heads on 2 kv heads, 32 wide
    unless `overrides` say otherwise."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    torch.manual_seed(0)
    config = config_class(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                             **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def base_model(model_dir, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def write_adapter(base, directory, writer: str, config: dict, seed: int) -> None:
    model = copy.deepcopy(base)
    if writer == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
        randomize_lora(model, seed=seed, scale=0.3)
        model.save_pretrained(directory)
    else:
        lorakit.apply(model, lorakit.LoraConfig(init_lora_weights=False, **config))
        randomize_lora(model, seed=seed, scale=0.3)
        lorakit.save_adapter(model, directory)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    """{name: directory} of every adapter in ADAPTERS, for the tiny model."""
    base = base_model(tiny_model_dir)
    root = tmp_path_factory.mktemp("serve-adapters")
    dirs = {}
    for seed, (name, (writer, config)) in enumerate(ADAPTERS.items(), start=1):
        write_adapter(base, root / name, writer, config, seed)
        dirs[name] = root / name
    return dirs


def reference_tokens(model_dir, adapter_dir, prompt_ids: list[int], n: int, peer: str = "lorakit") -> list[int]:
    """Greedy tokens of `model.generate` on the base with only this adapter active (lorakit's or PEFT's)."""
    return list(_reference(str(model_dir), None if adapter_dir is None else str(adapter_dir), tuple(prompt_ids), n, peer))


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def _reference(model_dir, adapter_dir, prompt_ids, n, peer):
    model = base_model(model_dir)
    model.generation_config.eos_token_id = None  # exactly n tokens, as the engine's ignore_eos
    if adapter_dir is not None and peer == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    elif adapter_dir is not None:
        lorakit.load_adapter(model, adapter_dir)
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()
