"""Shared pieces of the fuzz tests: hypothesis profiles and mutations of the files lorakit reads.

The regular suite runs a small fixed-seed budget (profile "ci"); `make fuzz` sets LORAKIT_FUZZ=1 for at
least 1,000 cases per target (profile "fuzz"). Every failure a fuzz run finds becomes a plain regression test.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from conftest import randomize_lora, tiny_llama
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

import lorakit
from lorakit.core.config import LoraConfig
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME

CI_EXAMPLES = 25
FUZZ_EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "1000"))

settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile("fuzz" if os.environ.get("LORAKIT_FUZZ") else "ci")

# JSON values of every type, including the ones no field expects (lists for mappings, numbers for strings).
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.sampled_from([0, -1, 10**9, 2**31, 2**62, 2**64])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["(", "[a-", "*", "q_proj", "all-linear", "(?P<x", "\\", "lora_only", "gaussian", "LORA"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(["q_proj", "(", "v_proj"]), inner,
                                             max_size=4), max_leaves=12)


class Sample(bytes):
    """A valid file's bytes, shown by name in hypothesis reports (not as kilobytes of escapes)."""

    def __new__(cls, data: bytes, name: str) -> "Sample":
        sample = super().__new__(cls, data)
        sample.name = name
        return sample

    def __repr__(self) -> str:
        return f"<valid {self.name}, {len(self)} bytes>"


def deeply_nested(depth: int) -> bytes:
    """A JSON document nested `depth` lists deep (the stdlib parser's recursion limit is ~1,000)."""
    return b"[" * depth + b"]" * depth


def json_dumps(value) -> bytes:
    """JSON as Python writes it, with NaN/Infinity allowed (what a careless writer produces)."""
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def mutated_json_object(draw, valid: dict, field_names: list[str]) -> bytes:
    """`valid` (a JSON object) with fields removed, replaced by values of any type, or added."""
    data = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete" and data:
            data.pop(draw(st.sampled_from(sorted(data))))
        elif action == "set":
            data[draw(st.sampled_from(field_names))] = draw(JSON_VALUES)
        else:
            data[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    return json_dumps(data)


@st.composite
def mutated_bytes(draw, valid: bytes) -> bytes:
    """`valid` truncated, with bytes flipped, non-UTF-8 inserted, emptied, or replaced by a deep nest."""
    kind = draw(st.sampled_from(["truncate", "flip", "non_utf8", "empty", "nested", "garbage"]))
    if kind == "truncate":
        return valid[:draw(st.integers(0, max(len(valid) - 1, 0)))]
    if kind == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "non_utf8":
        i = draw(st.integers(0, len(valid)))
        return valid[:i] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80\x80", b"\xed\xa0\x80"])) + valid[i:]
    if kind == "empty":
        return b""
    if kind == "nested":
        return deeply_nested(draw(st.integers(500, 100_000)))
    return draw(st.binary(max_size=64))


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header JSON, tensor bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def lying_safetensors(draw, valid: bytes) -> bytes:
    """A safetensors file whose header lies: offsets past the end or overlapping, wrong shapes or dtypes,
    a header length larger than the file, huge shapes."""
    header, body = split_safetensors(valid)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = dict(header[name])
    kind = draw(st.sampled_from(["offsets", "shape", "dtype", "header_len", "huge", "entry_type"]))
    if kind == "offsets":
        entry["data_offsets"] = [draw(st.integers(-10, len(body) * 3)), draw(st.integers(-10, len(body) * 3))]
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(-3, 70), max_size=4))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F64", "F16", "BF16", "I64", "I8", "BOOL", "U8", "F8_E4M3", "XX"]))
    elif kind == "huge":
        entry["shape"] = [2**40, 2**40]
    elif kind == "entry_type":
        entry = draw(JSON_VALUES)
    else:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", draw(st.integers(len(raw) + 1, 2**63))) + raw + body
    header[name] = entry
    return join_safetensors(header, body)


# ---- adapter directories: a valid LoRA adapter of conftest.tiny_llama, and its mutations ---------------
CONFIG_FIELDS = [f for f in LoraConfig.__dataclass_fields__] + ["peft_type", "revision", "loftq_config"]


def adapter_files(model, config: LoraConfig) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of `config` applied to `model`, with B != 0."""
    lorakit.apply(model, config)
    randomize_lora(model)
    with tempfile.TemporaryDirectory() as d:
        lorakit.save_adapter(model, d)
        return (Sample((Path(d) / CONFIG_NAME).read_bytes(), CONFIG_NAME),
                Sample((Path(d) / WEIGHTS_NAME).read_bytes(), WEIGHTS_NAME))


def valid_adapter() -> tuple[bytes, bytes]:
    """A small LoRA on conftest's tiny_llama with rank and alpha patterns."""
    return adapter_files(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                  rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}))


VALID_CONFIG, VALID_WEIGHTS = valid_adapter()


@st.composite
def mutated_tensors(draw, valid: bytes) -> bytes:
    """The adapter's tensors re-saved with NaN/Inf, another shape or dtype, a tensor missing or added."""
    tensors = dict(load_bytes(valid))
    name = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["nan", "inf", "shape", "dtype", "drop", "extra"]))
    t = tensors[name]
    if kind in ("nan", "inf"):
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = float(kind)
    elif kind == "shape":
        t = torch.zeros(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    elif kind == "dtype":
        t = t.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                                       torch.bool, torch.uint8])))
    elif kind == "drop":
        del tensors[name]
    else:
        tensors[name + draw(st.sampled_from([".x", "_extra"]))] = t.clone()
    if kind != "drop":
        tensors[name] = t
    return save_bytes(tensors)


def adapter_dir_cases(config: bytes, weights: bytes):
    """Mutations of one valid adapter directory: its config (fields and bytes), its weights (bytes, a lying
    safetensors header, tensors with other values, shapes and dtypes), one file at a time."""
    return st.one_of(
        st.tuples(mutated_json_object(json.loads(config), CONFIG_FIELDS), st.just(weights)),
        st.tuples(mutated_bytes(config), st.just(weights)),
        st.tuples(st.just(config), mutated_bytes(weights)),
        st.tuples(st.just(config), lying_safetensors(weights)),
        st.tuples(st.just(config), mutated_tensors(weights)),
    )


ADAPTER_DIRS = adapter_dir_cases(VALID_CONFIG, VALID_WEIGHTS)
