"""AdaLoRA: the budget schedule, exact-budget pruning, and a saved adapter that reloads (lorakit, PEFT) with equal logits."""
import json
import shutil

import pytest
import torch
from conftest import input_ids, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

import lorakit
from lorakit import LorakitError
from lorakit.cli.main import main
from lorakit.methods.adalora import (
    AdaLoraMethod,
    AdaLoraOptions,
    budget_at,
    select_triplets,
)
from lorakit.methods.lora import LoraOptions
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import build_config

FAST = ["--eval-samples", "2", "--max-new-tokens", "4", "--precision", "fp32", "--warmup-steps", "1"]


def test_budget_schedule_falls_to_the_target():
    total, init, target = 50, 12 * 7, 4 * 7
    budgets = [budget_at(step, total, init, target, prune_start=0.1, prune_end=0.7) for step in range(1, total + 1)]
    assert budgets[:5] == [init] * 5 and budgets[5] < init, "pruning starts after step round(0.1 * 50) = 5"
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), "the budget never grows"
    assert budgets[34:] == [target] * 16 and budgets[20] > target, "target from step round(0.7 * 50) = 35 on"
    assert budget_at(1, 1, init, target, 0.0, 1.0) == target, "a one-step run ends at the target too"


def test_select_triplets_keeps_exactly_the_budget():
    scores = [torch.tensor([0.5, 0.5, 0.1]), torch.tensor([0.5, 0.9]), torch.zeros(3)]
    masks = select_triplets(scores, 3)
    assert sum(int(m.sum()) for m in masks) == 3, "ties must not keep more than the budget"
    assert masks[1][1] and not masks[0][2] and not masks[2].any()


def run_adalora(model, steps=10, **overrides):
    cfg = TrainConfig(method="adalora", adalora=AdaLoraOptions(init_r=6, target_r=2, prune_start=0.2, prune_end=0.6),
                      lora=LoraOptions(target_modules=["q_proj", "v_proj", "down_proj"]), **overrides)
    method = AdaLoraMethod(cfg)
    method.apply(model, "tiny-llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = input_ids(batch=4, seq=16)
    for step in range(1, steps + 1):
        loss = model(ids, labels=ids).loss + method.regularizer(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(model, step, steps)
    return method


def test_pruned_adapter_reloads_with_equal_logits(tmp_path):
    model = tiny_llama()
    method = run_adalora(model)
    n = len(method.layers)
    assert sum(int(m.sum()) for m in method.kept.values()) == 2 * n, "the run ends at target_r x modules"
    for name, layer in method.layers:
        assert (layer.lora_E["default"][~method.kept[name]] == 0).all(), "pruned triplets are masked"
    method.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")]
    assert sum(ranks) == 2 * n and config["r"] in ranks and "lora_E" not in str(list(tensors))
    ids = input_ids()
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        base = tiny_llama()(ids).logits
        ours = lorakit.load_adapter(tiny_llama(), tmp_path)(ids).logits
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(ids).logits
    assert (expected - base).abs().max() > 1e-3, "training must have changed the output"
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused():
    for bad, match in ((dict(init_r=2, target_r=4), "target-r"), (dict(prune_start=0.8, prune_end=0.5), "prune"),
                       (dict(importance_beta=1.0), "importance-beta"), (dict(init_lora_weights="pissa"), "pissa")):
        with pytest.raises(LorakitError, match=match):
            build_config(TrainConfig, {"method": "adalora", **bad})
    TrainConfig(method="lora", adalora=AdaLoraOptions(init_r=2, target_r=4))  # AdaLoRA's fields do not matter to other methods
    with pytest.raises(LorakitError, match="linear layers only"):
        AdaLoraMethod(TrainConfig(method="adalora", lora=LoraOptions(target_modules=["embed_tokens"]))).apply(tiny_llama(), "x")


def test_train_cli_saves_the_budget_and_resumes_identically(tiny_model_dir, task_files, tmp_path):
    train, _ = task_files
    full = tmp_path / "full"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(train), *FAST, "--method", "adalora",
            "--init-r", "4", "--target-r", "2", "--prune-end", "0.5", "--max-steps", "8", "--batch-size", "2",
            "--save-every", "2"]
    assert main(args + ["--output", str(full)]) == 0
    tensors = load_file(full / "adapter" / "adapter_model.safetensors")
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")]
    assert len(ranks) <= 14 and sum(ranks) == 2 * 14, "all-linear on 2 layers: 14 modules, 2 triplets each on average"
    # resume after the kept set was fixed (step 4): it must be recovered, and the run end where it did
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "adapter")
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert main(args + ["--output", str(part), "--resume"]) == 0
    resumed = load_file(part / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == tensors.keys() and all(torch.equal(resumed[k], tensors[k]) for k in tensors)
