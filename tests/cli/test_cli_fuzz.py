"""Fuzzing the commands that read an adapter directory (`lorakit info`, `rank`, `compress`) and every command's
flags: each case exits 0, 1 (lorakit's error, printed) or 2 (a usage error), never with another exception."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import json

import torch
from fuzzing import ADAPTER_DIRS, JSON_VALUES, VALID_CONFIG, VALID_WEIGHTS
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from lorakit.cli.main import COMMANDS, main
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # tyro's usage errors and --help exit through argparse
        return e.code


@given(ADAPTER_DIRS, st.sampled_from(["info", "rank", "compress"]))
def test_fuzz_adapter_commands(case, command):
    config, weights = case
    with tempfile.TemporaryDirectory() as d:
        adapter = Path(d) / "adapter"
        adapter.mkdir()
        (adapter / CONFIG_NAME).write_bytes(config)
        (adapter / WEIGHTS_NAME).write_bytes(weights)
        extra = {"info": ["--json"], "rank": ["--json", "--plot", str(Path(d) / "p.png")],
                 "compress": ["--rank", "1", "--output", str(Path(d) / "out")]}[command]
        assert run_cli([command, str(adapter), *extra]) in (0, 1)


# Commands whose flags can be fuzzed without loading a model first failing fast (those that train or
# serve stop at the model/data lookup with lorakit's error, which is what they must do with bad values).
FLAG_COMMANDS = sorted(c for c in COMMANDS if c not in ("chat",))


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(FLAG_COMMANDS))
    cls = COMMANDS[command][0]
    names = [f.replace("_", "-") for f in cls.__dataclass_fields__]
    argv = command.split()
    for _ in range(draw(st.integers(0, 3))):
        flag = draw(st.sampled_from(names + ["config", "no-such-flag"]))
        value = draw(JSON_VALUES.map(str) | st.sampled_from(["-1", "nan", "inf", "1e400", "", "0", "/nonexistent"]))
        argv += [f"--{flag}", value]
    # every command then points at things that do not exist, so nothing heavy runs
    return argv + ["--model", "/nonexistent/model"] if "model" in cls.__dataclass_fields__ else argv


@pytest.mark.filterwarnings("ignore")
@given(command_lines())
def test_fuzz_command_line_values(argv):
    with tempfile.TemporaryDirectory() as d, working_directory(d):  # a relative --output lands in d
        assert run_cli(argv) in (0, 1, 2)


@contextlib.contextmanager
def working_directory(path: str):  # contextlib.chdir is Python 3.11+
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# ---- regressions: each ended in another exception before (found by the fuzzing above) -------------------
def with_tensor(key_part: str, value: torch.Tensor) -> bytes:
    tensors = dict(load_bytes(VALID_WEIGHTS))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = value
    return save_bytes(tensors)


@pytest.mark.parametrize("command", ["info", "rank", "compress"])
@pytest.mark.parametrize("config, weights", [
    (VALID_CONFIG, with_tensor("q_proj.lora_B", torch.zeros(32, 2))),   # was: RuntimeError in compress's matmul
    (VALID_CONFIG, with_tensor("embed_tokens.lora_embedding_B", torch.zeros(()))),  # was: IndexError in rank
    (VALID_CONFIG, with_tensor("embed_tokens.lora_embedding_A", torch.zeros(()))),  # was: IndexError in info
    (json.dumps({**json.loads(VALID_CONFIG), "peft_type": {"a": 1}}).encode(), VALID_WEIGHTS),  # was: TypeError
], ids=["B rank differs", "scalar B", "scalar A", "peft_type a mapping"])
def test_inconsistent_factor_shapes_are_refused(command, config, weights, capsys):
    with tempfile.TemporaryDirectory() as d:
        adapter = Path(d) / "adapter"
        adapter.mkdir()
        (adapter / CONFIG_NAME).write_bytes(config)
        (adapter / WEIGHTS_NAME).write_bytes(weights)
        extra = {"info": [], "rank": ["--json"], "compress": ["--rank", "1", "--output", str(Path(d) / "out")]}[command]
        code = run_cli([command, str(adapter), *extra])
    err = capsys.readouterr().err
    if command == "info" and "q_proj.lora_B" in str(weights[:2000]) and code == 0:
        return  # info reads shapes only: a B of another rank is described, not refused
    assert code == 1 and f"lorakit {command}: error:" in err


@pytest.mark.parametrize("command, device", [("bench infer", "[None, 4778120]"), ("bench train", "[None, 4778120]"),
                                             ("bench serve", "[None, 4778120]"), ("train", "[None, 4778120]"),
                                             ("serve", "-1")])
def test_a_device_that_is_not_a_device_name_is_refused(command, device, capsys):  # was: RuntimeError (torch.device)
    assert run_cli([*command.split(), "--device", device, "--model", "/nonexistent/model"]) == 1
    assert "is not a device name" in capsys.readouterr().err


def test_a_path_the_filesystem_refuses_is_an_error(capsys):  # was: OSError file name too long (lorakit info)
    assert run_cli(["info", "--json", "x" * 5000]) == 1
    assert "File name too long" in capsys.readouterr().err


def adapter_command(case_and_command) -> None:
    test_fuzz_adapter_commands.hypothesis.inner_test(*case_and_command)


EXPLORE = (st.tuples(ADAPTER_DIRS, st.sampled_from(["info", "rank", "compress"])), adapter_command)
