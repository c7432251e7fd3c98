"""Fuzzing the engine's adapter loading (what `lorakit serve` and POST /v1/load_lora_adapter call): any mutation
of an adapter directory is served or refused with LorakitError, and what was already loaded answers as before."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fuzzing import adapter_dir_cases, adapter_files
from hypothesis import given
from hypothesis import strategies as st
from serve_fixtures import base_model

import lorakit
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

PROMPT = "The history of the printing press"
GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="session")
def valid_files(tiny_model_dir):
    """A rank/alpha-patterned LoRA on the tiny model, B != 0: the directory every case mutates."""
    return adapter_files(base_model(tiny_model_dir), lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}))


@pytest.fixture(scope="session")
def engine_with_good_adapter(tiny_model_dir, smollm_tokenizer, valid_files, tmp_path_factory):
    """An engine serving the valid adapter as "good", and the tokens "good" gives for PROMPT."""
    good = tmp_path_factory.mktemp("good")
    (good / CONFIG_NAME).write_bytes(valid_files[0])
    (good / WEIGHTS_NAME).write_bytes(valid_files[1])
    engine = Engine(base_model(tiny_model_dir), smollm_tokenizer, EngineConfig(max_seq_len=64, max_batch_size=2))
    engine.load_adapter("good", good)
    return engine, engine.generate([Request(PROMPT, adapter="good", params=GREEDY)])[0].token_ids


@given(data=st.data())
def test_fuzz_engine_load_adapter(engine_with_good_adapter, valid_files, data):
    engine, good_tokens = engine_with_good_adapter
    config, weights = data.draw(adapter_dir_cases(*valid_files))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(config)
        (Path(d) / WEIGHTS_NAME).write_bytes(weights)
        try:
            engine.load_adapter("fuzzed", d)
        except lorakit.LorakitError:
            assert engine.adapters == ["good"]  # nothing already loaded changed
        else:
            out = engine.generate([Request(PROMPT, adapter="fuzzed", params=GREEDY)])[0]
            assert out.finish_reason == "length" and len(out.token_ids) == 3
            engine.unload_adapter("fuzzed")
    assert engine.generate([Request(PROMPT, adapter="good", params=GREEDY)])[0].token_ids == good_tokens


# ---- regressions: each ended in another exception before (found by the fuzzing above) -------------------
def test_a_factor_that_is_not_a_matrix_is_refused(engine_with_good_adapter, valid_files, tmp_path):
    """was: IndexError (a 0-d lora_A)."""
    from safetensors.torch import load, save

    engine, good_tokens = engine_with_good_adapter
    tensors = load(valid_files[1])
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.tensor(1.0)
    (tmp_path / CONFIG_NAME).write_bytes(valid_files[0])
    (tmp_path / WEIGHTS_NAME).write_bytes(save(tensors))
    with pytest.raises(lorakit.LorakitError, match="the adapter was trained on another base model"):
        engine.load_adapter("scalar", tmp_path)
    assert engine.adapters == ["good"]
