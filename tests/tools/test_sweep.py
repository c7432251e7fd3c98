"""`lorakit sweep`: one subprocess per value, the table and plot, the smallest run within tolerance."""
import json

import pytest

from lorakit import LorakitError
from lorakit.cli.main import main
from lorakit.methods.lora import LoraOptions
from lorakit.tools.sweep import SweepConfig, choose, run_configs, sweep_table

FAST = ["--eval-samples", "2", "--max-new-tokens", "4", "--precision", "fp32", "--warmup-steps", "1"]


def fake(em, loss, params, **extra):
    return {"exact_match": em, "loss": loss, "trainable_params": params, "adapter_bytes": 4 * params, "step_s": 0.5,
            "peak_rss_bytes": 2**30, "peak_cuda_bytes": None, "wall_s": 10.0,
            "before": {"exact_match": 0.0, "loss": 3.0}, **extra}


def test_choice_is_the_cheapest_within_tolerance():
    results = {"r=1": fake(0.70, 1.2, 100), "r=2": fake(0.795, 1.1, 200), "r=4": fake(0.80, 1.0, 400),
               "r=8": {"error": "out of memory", "log": "x"}}
    assert choose(results, "auto", 1.0) == ("exact_match", "r=2")
    assert choose(results, "auto", 0.0) == ("exact_match", "r=4")
    assert choose(results, "auto", 15.0) == ("exact_match", "r=1")
    assert choose({"r=1": fake(0.82, 1.0, 1), "r=2": fake(0.84, 1.0, 2)}, "auto", 2.0)[1] == "r=1", "the edge counts"
    assert choose(results, "loss", 10.0) == ("loss", "r=2"), "1.1 is within 10% of 1.0, 1.2 is not"
    table = sweep_table(results, "r", "r=2", "exact_match", 1.0)
    assert "| 2 | 200 |" in table and "79.5%" in table and "failed: out of memory" in table
    assert table.count("smallest within tolerance") == 1 and "base model before training" in table
    text_only = {"r=1": fake(None, 1.2, 100), "r=2": fake(None, 1.0, 200)}
    assert choose(text_only, "auto", 1.0) == ("loss", "r=2")
    with pytest.raises(LorakitError, match="instruction or chat"):
        choose(text_only, "exact_match", 1.0)


def test_each_value_becomes_a_train_config(tmp_path):
    runs = run_configs(SweepConfig(output=str(tmp_path), ranks=[2, 8], lr=3e-3, seed=7))
    assert list(runs) == ["r=2", "r=8"] and [c.lora.r for c in runs.values()] == [2, 8]
    assert all(c.lr == 3e-3 and c.seed == 7 for c in runs.values()) and runs["r=8"].output == str(tmp_path / "r8")
    runs = run_configs(SweepConfig(output=str(tmp_path), methods=["lora", "adalora"], lora=LoraOptions(r=4)))
    assert [(c.method, c.lora.r) for c in runs.values()] == [("lora", 4), ("adalora", 4)]
    with pytest.raises(LorakitError, match="unknown method"):
        run_configs(SweepConfig(methods=["lora", "nope"]))
    for bad in (dict(), dict(ranks=[1], methods=["lora"]), dict(ranks=[0]), dict(ranks=[2, 2])):
        with pytest.raises(LorakitError):
            SweepConfig(**bad)


def test_sweep_trains_in_a_subprocess_and_reports(tiny_model_dir, task_files, tmp_path, capsys):
    # One value keeps the test short (each run loads, measures twice and trains); choose/table cover several.
    train, evals = task_files
    out = tmp_path / "sweep"
    assert main(["sweep", "--ranks", "4", "--model", str(tiny_model_dir), "--data", str(train), "--eval-data",
                 str(evals), "--output", str(out), "--max-steps", "2", "--batch-size", "2", *FAST]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["vary"] == "r" and summary["metric"] == "exact_match" and summary["choice"] == "r=4"
    run = summary["runs"]["r=4"]
    adapter = out / "r4" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert run["adapter_bytes"] == sum(f.stat().st_size for f in adapter.iterdir())
    assert run["trainable_params"] == 4 * (32 + 32) * 2 * 2 + 4 * (32 + 16) * 2 * 2 + 4 * (32 + 64) * 2 * 3
    assert run["step_s"] > 0 and run["peak_rss_bytes"] > 2**20 and run["exact_match"] is not None
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "smallest within tolerance" in (out / "sweep.md").read_text()
    assert "| 4 |" in capsys.readouterr().out
