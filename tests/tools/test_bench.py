"""`lorakit bench` on a tiny model: every configuration runs and trains what it should; the report adds up.

Speed and memory targets live in the benchmark itself (README, Performance), never in these tests.
"""
from __future__ import annotations

import json

import pytest
import torch

from lorakit import LorakitError, LoraLayer
from lorakit.cli.main import main
from lorakit.core.layers import is_quantized
from lorakit.tools.bench import (
    BenchInferConfig,
    BenchTrainConfig,
    _median_run,
    step_function,
    bench_infer,
    bench_train,
)
from lorakit.training.models import default_dtype


def _cfg(model_dir, **kw):
    return BenchTrainConfig(model=str(model_dir), batch_size=2, seq_len=16, steps=1, warmup=1, device="cpu",
                            target_modules=["q_proj", "v_proj", "down_proj"], **kw)


def test_bench_train_json_has_every_configuration_and_consistent_ratios(tiny_model_dir, capsys):
    assert main(["bench", "train", "--model", str(tiny_model_dir), "--batch-size", "2", "--seq-len", "16",
                 "--steps", "1", "--warmup", "1", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    configs = out["configs"]
    assert list(configs) == ["limit", "floor", "lorakit", "peft", "full"]
    for name, r in configs.items():
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_mem_bytes"] > 0 and r["model_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"])
        for ref in ("floor", "peft"):
            if ref != name and name != "limit":
                assert r[f"tokens_per_s_vs_{ref}"] == pytest.approx(r["tokens_per_s"] / configs[ref]["tokens_per_s"])
                assert r[f"peak_mem_vs_{ref}"] == pytest.approx(r["peak_mem_bytes"] / configs[ref]["peak_mem_bytes"])
        if name != "limit":
            assert r["step_s_vs_limit"] == pytest.approx(r["step_s"] / configs["limit"]["step_s"])
    # the limit replays the lorakit step's products: at least every decoder linear's forward for all 32 tokens
    config = json.loads((tiny_model_dir / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    linear_macs = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    assert configs["limit"]["gemms"]["gemms"] > 0
    assert configs["limit"]["gemms"]["gflop"] * 1e9 >= 2 * 32 * linear_macs
    # floor/lorakit hold the frozen base in the compute dtype: half of peft's fp32 base where this CPU has
    # native bf16; fp32 too (plus the adapter) on a CPU without it (e.g. AVX2-only Zen 2)
    lorakit_bytes, peft_bytes = configs["lorakit"]["model_bytes"], configs["peft"]["model_bytes"]
    if default_dtype(torch.device("cpu")) == torch.bfloat16:
        assert lorakit_bytes < 0.6 * peft_bytes
    else:
        assert lorakit_bytes == peft_bytes


@pytest.mark.parametrize("name", ["floor", "lorakit", "peft", "full"])
def test_each_configuration_trains_what_it_should(tiny_model_dir, name):
    step, model = step_function(name, _cfg(tiny_model_dir), torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    if name == "floor":  # input gradients only: no weight has a gradient, nothing changes
        assert not changed and all(p.grad is None for p in model.parameters())
    elif name == "full":
        assert changed == set(before)
    else:  # lorakit and peft move only the LoRA factors, every B among them (B starts at zero)
        lora_b = {k for k in before if "lora_B" in k}
        assert lora_b and lora_b <= changed
        assert all("lora_" in k for k in changed)


def _trains_b(step, model) -> bool:
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k}
    step()
    return bool(before) and all(not torch.equal(v, before[k]) for k, v in model.named_parameters() if k in before)


def test_bench_dora_and_nf4_configurations_build(tiny_model_dir64):
    dora_step, dora = step_function("lorakit", _cfg(tiny_model_dir64, method="dora"), torch.device("cpu"))
    assert any("lora_magnitude_vector" in k for k, _ in dora.named_parameters())
    assert _trains_b(dora_step, dora)

    nf4_step, nf4 = step_function("lorakit", _cfg(tiny_model_dir64, quantize="nf4"), torch.device("cpu"))
    bases = [m.base_layer for m in nf4.modules() if isinstance(m, LoraLayer)]
    assert len(bases) == 6 and all(is_quantized(b) for b in bases)
    assert _trains_b(nf4_step, nf4)

    with pytest.raises(LorakitError, match="DoRA needs the dense base weight"):
        step_function("lorakit", _cfg(tiny_model_dir64, method="dora", quantize="nf4"), torch.device("cpu"))


def test_bench_infer_reports_all_rows(tiny_model_dir):
    out = bench_infer(BenchInferConfig(model=str(tiny_model_dir), new_tokens=4, repeats=1, device="cpu",
                                       target_modules=["q_proj", "v_proj"]))
    rates = out["tokens_per_s"]
    assert set(rates) == {"base", "base (copy)", "unmerged", "merged", "peft unmerged", "limit (bandwidth)"}
    assert min(rates.values()) > 0
    assert out["merged_vs_base"] == pytest.approx(rates["merged"] / rates["base"])
    assert out["base_vs_limit"] == pytest.approx(rates["base"] / rates["limit (bandwidth)"])


def test_rounds_keep_the_median_run_and_the_largest_peak():
    runs = [{"step_s": 3.0, "tokens_per_s": 1.0, "peak_mem_bytes": 5}, {"step_s": 1.0, "tokens_per_s": 3.0, "peak_mem_bytes": 9},
            {"step_s": 2.0, "tokens_per_s": 1.5, "peak_mem_bytes": 7}]
    chosen = _median_run(runs)
    assert chosen["step_s"] == 2.0 and chosen["tokens_per_s"] == 1.5 and chosen["peak_mem_bytes"] == 9
    assert chosen["step_s_rounds"] == [3.0, 1.0, 2.0]
    with pytest.raises(LorakitError, match="--rounds"):
        bench_train(BenchTrainConfig(rounds=0))
