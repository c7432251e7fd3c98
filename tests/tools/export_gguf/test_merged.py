"""The merged model as one GGUF file: llama.cpp runs it alone with lorakit's merged logits, transformers (an
independent reader) loads it back to the same model, and the base's metadata comes along."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_fixtures import (  # noqa: F401 (fixtures)
    PROMPTS,
    TOLERANCE,
    gguf_home,
    llama_cpp,
    llama_cpp_logits,
    lorakit_logits,
    lorakit_model,
    make_adapter,
    tiny_adapters,
    tiny_gguf,
    tiny_hf_dir,
)

from lorakit.tools.export_gguf.command import export_gguf

# max |logit difference| to lorakit's merged model per outtype (logit std about 1.6): every matrix is
# rounded now, not just the adapter's; measured worst f32 1e-5, f16 0.018, bf16 0.20, q8_0 0.26
MERGED_TOLERANCE = {"f32": 1e-4, "f16": 5e-2, "bf16": 0.5, "q8_0": 0.5}

pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_runs_the_merged_model_as_lorakit_does(tiny_gguf, tiny_adapters, tmp_path, outtype):
    result = export_gguf(tiny_adapters["patterns"], tmp_path / "gguf", merged=True, outtype=outtype)
    merged, _ = lorakit_model(tiny_gguf, tiny_adapters["patterns"], merged=True)
    agree = []
    with llama_cpp(result.gguf_file) as llm:
        for ids in PROMPTS:
            theirs, ours = llama_cpp_logits(llm, ids), lorakit_logits(merged, ids)
            assert np.abs(theirs - ours).max() < MERGED_TOLERANCE[outtype]
            agree += list(theirs.argmax(-1) == ours.argmax(-1))
    # a q8_0 model is a quantized model: 2 of the 18 positions (near-ties) flip; the other types agree everywhere
    assert np.mean(agree) >= (0.85 if outtype == "q8_0" else 1.0)


def test_merged_without_the_qk_permutation_fails_the_comparison(tiny_gguf, tiny_adapters, tmp_path):
    wrong = export_gguf(tiny_adapters["patterns"], tmp_path / "gguf", merged=True, outtype="f32", permute_qk=False)
    merged, _ = lorakit_model(tiny_gguf, tiny_adapters["patterns"], merged=True)
    with llama_cpp(wrong.gguf_file) as llm:
        assert np.abs(llama_cpp_logits(llm, PROMPTS[0]) - lorakit_logits(merged, PROMPTS[0])).max() > 1.0


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_transformers_reads_the_merged_file_back(tiny_gguf, tiny_adapters, tmp_path, outtype):
    from transformers import AutoModelForCausalLM

    result = export_gguf(tiny_adapters["patterns"], tmp_path / "gguf", merged=True, outtype=outtype)
    back = AutoModelForCausalLM.from_pretrained(str(result.gguf_file.parent), gguf_file=result.gguf_file.name).eval()
    merged, _ = lorakit_model(tiny_gguf, tiny_adapters["patterns"], merged=True)
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        diff = (back(ids).logits - merged(ids).logits).abs().max().item()
    # f32: the very weights (transformers undoes the permutation; measured 0.0); q8_0 rounds them (measured 0.26)
    assert diff < MERGED_TOLERANCE[outtype]


def test_merged_file_carries_the_base_metadata(tiny_gguf, tiny_adapters, tmp_path):
    import gguf

    result = export_gguf(tiny_adapters["patterns"], tmp_path / "gguf", merged=True, outtype="q8_0")
    base, out = gguf.GGUFReader(str(tiny_gguf)), gguf.GGUFReader(str(result.gguf_file))
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.pre", "llama.attention.head_count_kv", "llama.rope.freq_base", "general.name"):
        assert out.fields[key].contents() == base.fields[key].contents(), key
    assert out.fields["tokenizer.ggml.tokens"].contents() == base.fields["tokenizer.ggml.tokens"].contents()
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    kinds = {t.name: t.tensor_type.name for t in out.tensors}
    # tied embeddings: no output.weight; norms stay F32; matrices q8_0
    assert "output.weight" not in kinds and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.attn_q.weight"] == "Q8_0"
    assert result.modelfile.read_text().startswith(f"FROM ./{result.gguf_file.name}\nTEMPLATE")


def test_dora_exports_merged(tiny_gguf, tmp_path):
    adapter = make_adapter(tiny_gguf, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                           use_dora=True)
    result = export_gguf(adapter, tmp_path / "gguf", merged=True, outtype="f32")
    merged, _ = lorakit_model(tiny_gguf, adapter, merged=True)
    with llama_cpp(result.gguf_file) as llm:
        assert np.abs(llama_cpp_logits(llm, PROMPTS[0]) - lorakit_logits(merged, PROMPTS[0])).max() < TOLERANCE["f32"]


def test_a_hugging_face_base_directory_exports_too(tiny_hf_dir, tmp_path):
    """Adapter and merged export of an adapter trained on a HF directory (not a GGUF file)."""
    adapter = make_adapter(tiny_hf_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    merged_file = export_gguf(adapter, tmp_path / "merged", merged=True, outtype="f32").gguf_file
    adapter_file = export_gguf(adapter, tmp_path / "adapter-gguf", outtype="f32").gguf_file
    ours, _ = lorakit_model(tiny_hf_dir, adapter)
    expected = lorakit_logits(ours, PROMPTS[0])
    with llama_cpp(merged_file) as llm:
        assert np.abs(llama_cpp_logits(llm, PROMPTS[0]) - expected).max() < TOLERANCE["f32"]
    # the adapter file runs over the HF base written as GGUF
    from lorakit.tools.export_gguf.merged import write_model_gguf
    from lorakit.tools.export_gguf.names import arch_for
    from lorakit.training.models import load_model, model_config_dict

    config = model_config_dict(str(tiny_hf_dir))
    base = write_model_gguf(tmp_path / "base.gguf", load_model(str(tiny_hf_dir), device="cpu").model, config,
                            arch_for(config), "f32", hf_dir=tiny_hf_dir)
    with llama_cpp(base, adapter_file) as llm:
        assert np.abs(llama_cpp_logits(llm, PROMPTS[0]) - expected).max() < TOLERANCE["f32"]
