"""`lorakit rank`: exact spectra of constructed updates, effective ranks, suggested rank_pattern, CLI and plot."""
import json

import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.cli.main import main
from lorakit.core.active import lora_layers
from lorakit.tools.rank import (
    analyze,
    effective_rank,
    module_depth,
    module_kind,
    suggest_rank_pattern,
)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


@torch.no_grad()
def set_update(layer, sigmas: list[float], seed: int) -> None:
    """Make the layer's update scaling * B A = U diag(sigmas) V^T exactly (U, V orthonormal), rank len(sigmas) <= r."""
    A, B = layer.factors("default")
    r, k = A.shape[0], len(sigmas)
    s = torch.tensor(sigmas) / layer.scaling["default"]
    U, V = orthonormal(B.shape[0], k, seed), orthonormal(A.shape[1], k, seed + 100)
    B.zero_()
    A.zero_()
    B[:, :k] = U * s.sqrt()
    A[:k] = s.sqrt()[:, None] * V.T
    assert r >= k


@pytest.fixture
def constructed(tmp_path):
    """An r=8 adapter whose q_proj updates have the known spectra [4, 2, 1] and [3] and v_proj [5, 5, 5, 5]."""
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    spectra = {"model.layers.0.self_attn.q_proj": [4.0, 2.0, 1.0], "model.layers.1.self_attn.q_proj": [3.0],
               "model.layers.0.self_attn.v_proj": [5.0] * 4, "model.layers.1.self_attn.v_proj": [1.0, 0.5]}
    layers = dict(lora_layers(model))
    for i, (name, sigmas) in enumerate(spectra.items()):
        set_update(layers[name], sigmas, seed=i)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", spectra


def test_constructed_spectrum_is_recovered_exactly(constructed):
    directory, spectra = constructed
    result = analyze(directory)
    for name, sigmas in spectra.items():
        got = torch.tensor(result["modules"][name]["singular_values"])
        expected = torch.tensor(sigmas + [0.0] * (8 - len(sigmas)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # [4, 2, 1]: energies 16, 4, 1 of 21 -> 76%, 95.2%, 100%
    assert result["modules"]["model.layers.0.self_attn.q_proj"]["effective_rank"] == {"0.9": 2, "0.95": 2, "0.99": 3}
    assert result["modules"]["model.layers.0.self_attn.v_proj"]["effective_rank"] == {"0.9": 4, "0.95": 4, "0.99": 4}
    # the largest need of each type: q_proj 2 (layer 0), v_proj 4 (layer 0)
    assert result["suggested_rank_pattern"] == {"q_proj": 2, "v_proj": 4}


def test_effective_rank_rules():
    values = torch.tensor([3.0, 0.0, 0.0])
    assert effective_rank(values, 0.5) == 1 and effective_rank(values, 1.0) == 1
    assert effective_rank(torch.zeros(4), 0.9) == 0
    assert effective_rank(torch.ones(4), 1.0) == 4 and effective_rank(torch.ones(4), 0.5) == 2
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(LorakitError, match="energy"):
            effective_rank(values, bad)
    assert suggest_rank_pattern({"a.0.q": torch.zeros(4)}, 0.9) == {"q": 1}  # an untrained type still gets a rank
    assert module_kind("model.layers.3.self_attn.q_proj") == "q_proj"
    assert module_depth("model.layers.3.self_attn.q_proj") == 3 and module_depth("lm_head") is None


def test_cli_json_table_and_plot(constructed, tmp_path, capsys):
    directory, spectra = constructed
    png = tmp_path / "plots" / "spectrum.png"
    assert main(["rank", str(directory), "--json", "--plot", str(png), "--energy", "0.99"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["modules"]) == set(spectra) and out["suggested_rank_pattern"] == {"q_proj": 3, "v_proj": 4}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["plot"] == str(png)
    assert main(["rank", str(directory), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in text and 'suggested rank_pattern' in text


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["rank", str(tmp_path)]) == 1
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(["rank"]) == 1
    assert "needs an adapter directory" in capsys.readouterr().err
