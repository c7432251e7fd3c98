"""lorakit.tools.info: what an adapter directory holds."""
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
