"""Fuzzing `lorakit export --to gguf`: any mutation of an adapter directory exports a file llama.cpp's reader
(gguf-py) opens, or ends with LorakitError and leaves no output directory behind."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fuzzing import adapter_dir_cases, adapter_files
from gguf_fixtures import gguf_home, tiny_gguf, tiny_hf_dir  # noqa: F401 (fixtures)
from hypothesis import given
from hypothesis import strategies as st

import lorakit
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.tools.export_gguf.command import export_gguf


@pytest.fixture(scope="session")
def valid_files(tiny_gguf):
    """A rank/alpha-patterned LoRA on the tiny GGUF base (q and k: the permuted rows), B != 0."""
    from lorakit.training.models import load_model

    return adapter_files(load_model(str(tiny_gguf), device="cpu").model, lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}))


@given(data=st.data())
def test_fuzz_export_gguf(tiny_gguf, valid_files, data):
    from gguf import GGUFReader

    config, weights = data.draw(adapter_dir_cases(*valid_files))
    with tempfile.TemporaryDirectory() as d:
        adapter, output = Path(d) / "adapter", Path(d) / "gguf"
        adapter.mkdir()
        (adapter / CONFIG_NAME).write_bytes(config)
        (adapter / WEIGHTS_NAME).write_bytes(weights)
        try:
            result = export_gguf(adapter, output, outtype="f32", model=str(tiny_gguf))
        except lorakit.LorakitError:
            assert not output.exists() and sorted(p.name for p in Path(d).iterdir()) == ["adapter"]
            return
        reader = GGUFReader(result.gguf_file)
        names = [t.name for t in reader.tensors]
        assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)


# ---- regressions: each ended in another exception before (found by the fuzzing above) -------------------
def test_a_config_without_lora_alpha_exports_with_peft_default(tiny_gguf, valid_files, tmp_path):
    """was: KeyError 'lora_alpha'. PEFT reads a missing lora_alpha as 8; so do lorakit's loader and export."""
    import json

    from gguf import GGUFReader

    config = json.loads(valid_files[0])
    del config["lora_alpha"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG_NAME).write_text(json.dumps(config))
    (adapter / WEIGHTS_NAME).write_bytes(valid_files[1])
    result = export_gguf(adapter, tmp_path / "gguf", outtype="f32", model=str(tiny_gguf))
    alpha = GGUFReader(result.gguf_file).fields["adapter.lora.alpha"]
    assert float(alpha.parts[alpha.data[0]][0]) == 8.0


@pytest.mark.parametrize("field, value", [("modules_to_save", True), ("use_dora", "yes"), ("bias", 3)])
def test_config_fields_of_the_wrong_type_are_refused(field, value, tiny_gguf, valid_files, tmp_path):
    """was: TypeError (modules_to_save: true). The config's fields are checked as lorakit's loader checks them."""
    import json

    config = {**json.loads(valid_files[0]), field: value}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG_NAME).write_text(json.dumps(config))
    (adapter / WEIGHTS_NAME).write_bytes(valid_files[1])
    with pytest.raises(lorakit.LorakitError, match=f"{field}=.* is invalid"):
        export_gguf(adapter, tmp_path / "gguf", outtype="f32", model=str(tiny_gguf))
    assert not (tmp_path / "gguf").exists()
