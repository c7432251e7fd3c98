"""Fuzzing `lorakit.load_adapter`: any mutation of an adapter directory loads, or raises LorakitError and
leaves the model as it was (never another exception, a memory blow-up or a half-loaded adapter)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from fuzzing import ADAPTER_DIRS, VALID_CONFIG, VALID_WEIGHTS
from hypothesis import given
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

import lorakit
from lorakit.core.config import LoraConfig
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME

def load_or_refuse(config: bytes, weights: bytes) -> None:
    """Load the adapter; on LorakitError the model must be exactly as before."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(config)
        (Path(d) / WEIGHTS_NAME).write_bytes(weights)
        try:
            lorakit.load_adapter(model, d)
        except lorakit.LorakitError:
            after = model.state_dict()
            assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
            return
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 96)


@given(ADAPTER_DIRS)
def test_fuzz_load_adapter(case):
    load_or_refuse(*case)


# ---- regressions: each was a crash other than LorakitError before (found by the fuzzing above) ----------
def config_with(**changes) -> bytes:
    import json

    return json.dumps({**json.loads(VALID_CONFIG), **changes}).encode()


@pytest.mark.parametrize("changes, message", [
    ({"r": 10**9}, "rank 1000000000"),                                # was: out of memory allocating the factors
    ({"rank_pattern": {"v_proj": 2**40}}, "rank 1099511627776"),       # was: out of memory
    ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),   # was: re.error
    ({"alpha_pattern": {"(?i)q": 2}}, "not a valid regular expression"),  # was: re.error (flags mid-pattern)
    ({"layers_pattern": "[a-", "layers_to_transform": [0]}, "not a valid regular expression"),  # was: re.error
    ({"target_modules": "(?P<x"}, "not a valid regular expression"),  # was: re.error
    ({"rank_pattern": [1, 2]}, "give a mapping"),                     # was: AttributeError 'list'.items
    ({"alpha_pattern": [-2.5, None]}, "give a mapping"),              # was: AttributeError 'list'.items
    ({"exclude_modules": [{"": "x"}, {}]}, "exclude_modules"),        # was: TypeError str + dict
    ({"target_modules": [3, "q_proj"]}, "target_modules"),            # was: TypeError str + int
    ({"layers_to_transform": ["0"]}, "layers_to_transform"),
    ({"use_dora": "yes"}, "use_dora"),
    ({"init_lora_weights": 1.0}, "init_lora_weights"),
    ({"bias": ["none"]}, "bias"),
])
def test_bad_config_values_are_refused_by_name(changes, message):
    model = tiny_llama()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(config_with(**changes))
        (Path(d) / WEIGHTS_NAME).write_bytes(VALID_WEIGHTS)
        with pytest.raises(lorakit.LorakitError, match=message.replace("(", r"\(")):
            lorakit.load_adapter(model, d)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_deeply_nested_config_is_refused():  # was: RecursionError from the JSON parser
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(b"[" * 100_000 + b"]" * 100_000)
        (Path(d) / WEIGHTS_NAME).write_bytes(VALID_WEIGHTS)
        with pytest.raises(lorakit.LorakitError, match="not valid JSON"):
            lorakit.load_adapter(tiny_llama(), d)


@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf")])
def test_non_finite_weights_are_refused(value, message):  # was: loaded, then every output NaN
    tensors = dict(load_bytes(VALID_WEIGHTS))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    with pytest.raises(lorakit.LorakitError, match=message):
        load_or_refuse_strict(VALID_CONFIG, save_bytes(tensors))


def test_integer_weights_are_refused():  # was: silently cast to float
    tensors = {k: v.to(torch.int64) for k, v in load_bytes(VALID_WEIGHTS).items()}
    with pytest.raises(lorakit.LorakitError, match="dtype torch.int64"):
        load_or_refuse_strict(VALID_CONFIG, save_bytes(tensors))


def load_or_refuse_strict(config: bytes, weights: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(config)
        (Path(d) / WEIGHTS_NAME).write_bytes(weights)
        lorakit.load_adapter(tiny_llama(), d)


def test_apply_refuses_a_rank_larger_than_free_memory():  # was: out of memory inside apply
    model = tiny_llama()
    with pytest.raises(lorakit.LorakitError, match="GiB free"):
        lorakit.apply(model, LoraConfig(r=2**40, target_modules=["q_proj"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())
