"""A lorakit LoRA adapter as a llama.cpp LoRA file, checked by llama.cpp itself: base + adapter in llama.cpp
gives lorakit's unmerged logits (per outtype), the adapter changes the output, and the same file written
without the Q/K row permutation fails the same comparison (the classic bug the check must catch)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf_fixtures import (  # noqa: F401 (fixtures)
    PROMPTS,
    TOLERANCE,
    gguf_home,
    llama_cpp,
    llama_cpp_greedy,
    llama_cpp_logits,
    lorakit_logits,
    lorakit_model,
    make_adapter,
    tiny_adapters,
    tiny_gguf,
    tiny_hf_dir,
)

from lorakit import LorakitError
from lorakit.tools.export_gguf.command import export_gguf

pytest.importorskip("llama_cpp")


def worst_difference(base, adapter_file, model) -> tuple[float, float]:
    """(max |logit difference|, argmax agreement) of llama.cpp with the adapter file vs lorakit, over PROMPTS."""
    diffs, agree = [], []
    with llama_cpp(base, adapter_file) as llm:
        for ids in PROMPTS:
            theirs, ours = llama_cpp_logits(llm, ids), lorakit_logits(model, ids)
            diffs.append(np.abs(theirs - ours).max())
            agree.append((theirs.argmax(-1) == ours.argmax(-1)).mean())
    return float(max(diffs)), float(np.mean(agree))


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ["patterns", "rslora"])
def test_llama_cpp_runs_the_adapter_as_lorakit_does(tiny_gguf, tiny_adapters, tmp_path, name, outtype):
    result = export_gguf(tiny_adapters[name], tmp_path / "gguf", outtype=outtype)
    model, _ = lorakit_model(tiny_gguf, tiny_adapters[name])
    diff, agree = worst_difference(tiny_gguf, result.gguf_file, model)
    print(f"{name} {outtype}: max |diff| {diff:.2e}, argmax agreement {agree:.3f}")
    assert diff < TOLERANCE[outtype] and agree == 1.0
    # the adapter matters: the base alone is far from lorakit's adapted logits
    base_diff, _ = worst_difference(tiny_gguf, None, model)
    assert base_diff > 20 * TOLERANCE[outtype]


def test_export_without_the_qk_permutation_fails_the_comparison(tiny_gguf, tiny_adapters, tmp_path):
    model, _ = lorakit_model(tiny_gguf, tiny_adapters["rslora"])
    wrong = export_gguf(tiny_adapters["rslora"], tmp_path / "wrong", outtype="f32", permute_qk=False)
    diff, agree = worst_difference(tiny_gguf, wrong.gguf_file, model)
    print(f"without the permutation: max |diff| {diff:.2e}, argmax agreement {agree:.3f}")
    assert diff > max(TOLERANCE.values())  # fails even the loosest outtype's check


def test_greedy_continuations_match_token_for_token(tiny_gguf, tiny_adapters, tmp_path):
    import torch

    result = export_gguf(tiny_adapters["patterns"], tmp_path / "gguf", outtype="f32")
    model, _ = lorakit_model(tiny_gguf, tiny_adapters["patterns"])
    with llama_cpp(tiny_gguf, result.gguf_file) as llm:
        for ids in PROMPTS:
            ours = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
            assert llama_cpp_greedy(llm, ids, 32) == ours


def test_adapter_file_holds_only_lora_pairs_in_llama_cpp_layout(tiny_gguf, tiny_adapters, tmp_path):
    import gguf

    result = export_gguf(tiny_adapters["patterns"], tmp_path / "gguf", outtype="f16")
    reader = gguf.GGUFReader(str(result.gguf_file))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("general.architecture")) == ("adapter", "lora", "llama")
    assert field("adapter.lora.alpha") == 8.0
    names = {t.name: t for t in reader.tensors}
    # 7 linears x 2 layers x (lora_a, lora_b); no norms, rope or output tensors
    assert len(names) == 28 and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    # llama.cpp's shapes (ggml order, reversed): lora_a (d_in, r), lora_b (r, d_out); v_proj at its own rank 2
    assert list(names["blk.0.attn_v.weight.lora_a"].shape) == [64, 2]
    assert list(names["blk.0.attn_v.weight.lora_b"].shape) == [2, 32]
    assert "Modelfile" in {p.name for p in result.gguf_file.parent.iterdir()}
    assert result.modelfile.read_text().splitlines()[:2] == [f"FROM {tiny_gguf}", f"ADAPTER ./{result.gguf_file.name}"]


@pytest.mark.parametrize("lora, what", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "biases"),
])
def test_what_llama_cpp_cannot_hold_is_refused_naming_merged(tiny_gguf, tmp_path, lora, what):
    adapter = make_adapter(tiny_gguf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"], **lora)
    with pytest.raises(LorakitError, match=f"{what}.*--merged"):
        export_gguf(adapter, tmp_path / "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing half-written


def test_lora_on_a_tied_lm_head_is_refused(tiny_gguf, tmp_path):
    adapter = make_adapter(tiny_gguf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["lm_head"])
    with pytest.raises(LorakitError, match="tied embeddings.*--merged"):
        export_gguf(adapter, tmp_path / "gguf")


def test_a_failure_while_writing_leaves_nothing(tiny_gguf, tiny_adapters, tmp_path, monkeypatch):
    from lorakit.tools.export_gguf import writer

    def fail_after_header(path, *args, **kwargs):
        path.write_bytes(b"GGUF partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_gguf", fail_after_header)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_adapters["rslora"], tmp_path / "gguf")
    assert list(tmp_path.iterdir()) == []
