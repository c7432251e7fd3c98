"""`lorakit bench train --profile`: operator time by category."""
from __future__ import annotations

import torch

from lorakit.tools.bench import BenchTrainConfig, bench_train
from lorakit.tools.step_profile import breakdown_table, category, profile_step


def test_categories_of_the_step_operators():
    assert category("aten::addmm") == category("aten::mm") == category("aten::bmm") == "matmul"
    assert category("aten::_log_softmax") == category("aten::nll_loss_forward") == "loss"
    assert category("aten::_softmax") == category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("aten::_fused_adamw_") == category("aten::_foreach_mul_") == "optimizer"
    assert category("aten::rsqrt") == category("aten::mean") == "norm"
    assert category("aten::silu_backward") == category("aten::add_") == "elementwise"
    assert category("aten::_to_copy") == category("aten::copy_") == "cast/copy"
    assert category("aten::view") == "other"


def test_profile_step_puts_a_matmul_step_in_matmul():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    prof = profile_step(lambda: torch.mm(a, b).relu_(), steps=2)
    assert prof["matmul"] > 0 and max(prof, key=prof.get) == "matmul"
    table = breakdown_table({"mm": prof})
    assert table.splitlines()[2].startswith("| mm | ") and "matmul" in table.splitlines()[0]


def test_bench_train_profile_reports_every_configuration(tiny_model_dir, capsys):
    cfg = BenchTrainConfig(model=str(tiny_model_dir), batch_size=2, seq_len=16, steps=1, warmup=1, device="cpu",
                           configs=["limit", "lorakit", "peft"], profile=True)
    out = bench_train(cfg)
    printed = capsys.readouterr().out
    assert "where the time goes" in printed
    assert "profile" not in out["configs"]["limit"]  # the limit replays products, it has no step to profile
    for name in ("lorakit", "peft"):
        prof = out["configs"][name]["profile"]
        assert prof["matmul"] > 0 and prof["optimizer"] > 0
        assert sum(prof.values()) > 0 and f"| {name} | " in printed
