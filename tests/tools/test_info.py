"""lorakit.tools.info: what an adapter directory holds."""
import json
import time

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.tools.info import InfoConfig, run_info


def test_info_of_a_saved_adapter(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    lorakit.apply(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], rank_pattern={"^2$": 3}))
    lorakit.save_adapter(model, tmp_path / "a")
    info = run_info(InfoConfig(adapter=str(tmp_path / "a"), json=True))
    assert info["adapted_modules"] == 2 and info["ranks"] == [2, 3] and info["r"] == 2
    assert info["parameters"] == 2 * (8 + 6) + 3 * (6 + 4) and info["file_bytes"] > 0
    assert '"adapted_modules": 2' in capsys.readouterr().out


def test_info_needs_an_adapter_directory(tmp_path):
    with pytest.raises(LorakitError, match="needs an adapter directory"):
        run_info(InfoConfig())
    with pytest.raises(LorakitError, match="adapter_config.json not found"):
        run_info(InfoConfig(adapter=str(tmp_path)))


def test_info_system_shows_this_machine_and_its_cached_kernel_choices(tmp_path, monkeypatch, capsys):
    from lorakit.cli.main import main
    from lorakit.core import autotune

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    autotune.forget_process_decisions()
    try:
        winner = autotune.choose("demo", "n8", {"slow": lambda: time.sleep(0.003), "fast": lambda: None}, repeats=2)
    finally:
        autotune.forget_process_decisions()
    assert main(["info", "--system", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] == autotune.cpu_model() and info["torch"] == torch.__version__
    assert info["kernels"] == {"demo[n8]": winner} and winner == "fast"
    assert info["autotune_cache"] == str(tmp_path / autotune.FILE_NAME)
    assert main(["info", "--system"]) == 0
    assert "demo[n8]" in capsys.readouterr().out
