"""The embedded SmolLM2-135M-Instruct (a Q4_1 GGUF file, 9 heads, 3 key-value heads, tied embeddings) through
llama.cpp: an adapter file over the quantized base agrees with lorakit up to the base's own noise floor, and
the merged f32 file (unquantized) agrees tightly and reads back through transformers."""
from __future__ import annotations

import numpy as np
import pytest
from gguf_fixtures import gguf_home, llama_cpp, llama_cpp_logits, lorakit_logits, lorakit_model  # noqa: F401

import lorakit
from conftest import randomize_lora
from lorakit.tools.export_gguf.command import export_gguf

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_adapter(tmp_path_factory, gguf_home):
    from lorakit.training.models import load_model

    loaded = load_model(None, device="cpu")
    lorakit.apply(loaded.model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                   base_model_name_or_path="default"))
    randomize_lora(loaded.model, scale=0.02)
    tok = loaded.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
               for text in ("Turn this note into a record: Ann Lee wants 3 red chairs in Oslo by May 2.",
                            "What is the capital of France?", "Write a haiku about autumn.")]
    return lorakit.save_adapter(loaded.model, tmp_path_factory.mktemp("default") / "adapter"), prompts


def test_adapter_over_the_q4_1_base_agrees_up_to_the_noise_floor(default_adapter, tmp_path):
    from lorakit.training.models import default_gguf_path

    adapter, prompts = default_adapter
    result = export_gguf(adapter, tmp_path / "gguf", outtype="f16")
    model, _ = lorakit_model(default_gguf_path(), adapter)
    agree, diffs = [], []
    with llama_cpp(default_gguf_path(), result.gguf_file, n_ctx=512) as llm:
        for ids in prompts:
            theirs, ours = llama_cpp_logits(llm, ids), lorakit_logits(model, ids)
            agree += list(theirs.argmax(-1) == ours.argmax(-1))
            diffs += list(np.abs(theirs - ours).max(-1))
    # the Q4_1 base alone differs from transformers' dequantized copy by a median 0.8 per position, argmax ~98%
    print(f"adapter f16 over Q4_1: argmax agreement {np.mean(agree):.3f}, median max |diff| {np.median(diffs):.2f}")
    assert np.mean(agree) >= 0.9 and np.median(diffs) < 2.0


def test_merged_f32_agrees_tightly_and_reads_back(default_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.training.models import default_gguf_path

    adapter, prompts = default_adapter
    result = export_gguf(adapter, tmp_path / "gguf", merged=True, outtype="f32")
    merged, _ = lorakit_model(default_gguf_path(), adapter, merged=True)
    with llama_cpp(result.gguf_file, n_ctx=512) as llm:
        for ids in prompts:
            theirs, ours = llama_cpp_logits(llm, ids), lorakit_logits(merged, ids)
            print(f"merged f32: max |diff| {np.abs(theirs - ours).max():.2e}")
            assert np.abs(theirs - ours).max() < 1e-3 and (theirs.argmax(-1) == ours.argmax(-1)).all()  # measured 7e-5
    back = AutoModelForCausalLM.from_pretrained(str(result.gguf_file.parent), gguf_file=result.gguf_file.name).eval()
    assert np.abs(lorakit_logits(back, prompts[0]) - lorakit_logits(merged, prompts[0])).max() < 1e-4
