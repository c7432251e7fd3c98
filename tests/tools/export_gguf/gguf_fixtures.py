"""Shared builders for the GGUF export tests: a tiny Llama written as an f32 GGUF base (SmolLM2's tokenizer,
so llama.cpp accepts it), LoRA adapters on it with B != 0, and llama.cpp's logits through llama-cpp-python."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from conftest import randomize_lora

# name -> LoraConfig kwargs: per-module ranks and alphas (folded into B), rsLoRA, GQA's K among the targets
ADAPTERS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2, "gate_proj": 6},
                     alpha_pattern={"o_proj": 3, "k_proj": 12}),
    "rslora": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj"], use_rslora=True),
}
# token ids of a few prompts (SmolLM2's vocabulary), the same for llama.cpp and lorakit
PROMPTS = [[1, 504, 3458, 314, 253, 1345, 28, 2520], [9, 33, 2000, 17, 450, 300, 5, 11884, 77, 6]]
# max |logit difference| llama.cpp vs lorakit per outtype on the tiny model (logit std about 1.6; measured
# worst: f32 1e-5, f16 5e-3, bf16 5e-2, q8_0 8e-2): f32 is float rounding, the others the rounding of the
# written matrices and of the activations llama.cpp's kernels convert to the weights' type
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 1.5e-1, "q8_0": 2e-1}


@pytest.fixture(scope="session")
def gguf_home(tmp_path_factory):
    """lorakit's cache of converted GGUF files, in a temporary directory for this session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LORAKIT_HOME", str(tmp_path_factory.mktemp("lorakit-home")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A 2-layer Llama (4 heads, 2 key-value heads, tied embeddings) with SmolLM2's tokenizer, as a HF directory.

    Initialised 10x wider than transformers' default so that its logits spread (std about 2) and a
    top token is not a near-tie that any rounding flips.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.2, bos_token_id=smollm_tokenizer.bos_token_id,
                      eos_token_id=smollm_tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("tiny-hf")
    LlamaForCausalLM(cfg).save_pretrained(directory)
    smollm_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf_dir, gguf_home) -> Path:
    """tiny_hf_dir's Llama as an f32 GGUF base file, written by lorakit's merged-model writer from the HF directory."""
    from lorakit.tools.export_gguf.merged import write_model_gguf
    from lorakit.tools.export_gguf.names import arch_for
    from lorakit.training.models import load_model, model_config_dict

    config = model_config_dict(str(tiny_hf_dir))
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf"
    model = load_model(str(tiny_hf_dir), device="cpu").model
    return write_model_gguf(path, model, config, arch_for(config), "f32", hf_dir=tiny_hf_dir)


def make_adapter(base: Path, directory: Path, seed: int = 1, **lora) -> Path:
    """A LoRA adapter with random A and B on the GGUF base `base`, saved to `directory`."""
    from lorakit.training.models import load_model

    model = load_model(str(base), device="cpu").model
    lorakit.apply(model, lorakit.LoraConfig(base_model_name_or_path=str(base), **lora))
    randomize_lora(model, seed=seed, scale=0.1)
    return lorakit.save_adapter(model, directory)


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_gguf) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_gguf, root / name, **lora) for name, lora in ADAPTERS.items()}


def lorakit_model(base: Path, adapter: Path | None, merged: bool = False):
    """The base with the adapter in fp32 (merged if asked), and its tokenizer, as lorakit runs it."""
    from lorakit.methods.combine import merge_and_unload
    from lorakit.training.loading import load_with_adapter

    loaded = load_with_adapter(str(base), str(adapter) if adapter else None, device="cpu", precision="fp32")
    return (merge_and_unload(loaded.model) if merged else loaded.model), loaded.tokenizer


@torch.no_grad()
def lorakit_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@contextlib.contextmanager
def llama_cpp(model_path: Path, lora: Path | None = None, n_ctx: int = 256):
    """llama.cpp (llama-cpp-python) with the GGUF file, and the LoRA adapter file at scale 1 if given."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=n_ctx,
                n_threads=2, n_batch=n_ctx, verbose=False, seed=0,
                type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32): the default f16 one rounds K and V
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits at every position of `ids` (a fresh context each call)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n tokens of greedy decoding in llama.cpp, stopping at no end-of-text token (compared position by position)."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out
