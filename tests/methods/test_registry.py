"""Every registered method through the one interface, on a tiny Llama with random (non-zero) parameters:
apply -> save -> load gives equal logits; its parameter groups are exactly the trainable parameters and
make_optimizer gives them the declared rates; merging is exact or refused; `lorakit info` describes it."""
import json

import pytest
import torch
from conftest import input_ids, tiny_llama

from lorakit import LorakitError
from lorakit.cli.main import main
from lorakit.methods import combine
from lorakit.methods.adalora import AdaLoraOptions
from lorakit.methods.bottleneck import BottleneckOptions
from lorakit.methods.lora import LoraOptions
from lorakit.methods.prefix import VirtualTokenOptions
from lorakit.methods.registry import LOADERS, METHODS, make_methods, optimizer_groups
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import field_types, is_group
from lorakit.training.loop import make_optimizer

# What `lorakit info` must show for each method's directory (beyond the rows every adapter has).
EXPECTED_ROWS = {
    "lora": {"peft_type": "LORA", "r": 4, "ranks": [4], "adapted_modules": 14, "use_dora": False},
    "dora": {"peft_type": "LORA", "use_dora": True, "ranks": [4]},
    "pissa": {"peft_type": "LORA", "ranks": [8]},  # saved as the rank-2r LoRA it is against the original W
    "adalora": {"peft_type": "LORA", "ranks": [6], "adapted_modules": 14},  # no step taken: every triplet kept
    "ia3": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "adapted_modules": 6},
    "adapter": {"peft_type": "BOTTLENECK", "bottleneck_size": 4},
    "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_layers": 2, "token_dim": 16},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 32},
}


def run_config(method: str, **changes) -> TrainConfig:
    return TrainConfig(method=method, lora=LoraOptions(r=4, loraplus_lr_ratio=4.0),
                       adalora=AdaLoraOptions(init_r=6, target_r=2),
                       bottleneck=BottleneckOptions(bottleneck_size=4),
                       virtual_tokens=VirtualTokenOptions(num_virtual_tokens=3), **changes)


def adapted(method: str, **changes):
    """(model, methods, cfg): a tiny Llama with `method` applied and every trainable parameter moved."""
    cfg = run_config(method, **changes)
    model, methods = tiny_llama(), make_methods(cfg)
    combine.apply_methods(methods, model, "tiny-llama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.1 * torch.randn(param.shape, generator=g))
    return model, methods, cfg


def test_the_registry_tables():
    assert list(METHODS) == ["lora", "dora", "pissa", "adalora", "ia3", "adapter", "prefix", "prompt"]
    assert all(METHODS[name].name == name for name in METHODS)
    assert {m.options for m in METHODS.values()} <= {t for t in field_types(TrainConfig).values() if is_group(t)}, \
        "every method's options are a group of TrainConfig"
    assert {kind.peft_type: kind.name for kind in LOADERS.values()} == {
        "LORA": "lora", "IA3": "ia3", "BOTTLENECK": "adapter", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
    with pytest.raises(LorakitError, match="unknown method 'lora\\+nope'"):
        TrainConfig(method="lora+nope")
    with pytest.raises(LorakitError, match="--method-lr-ratio names unknown method"):
        TrainConfig(method_lr_ratio={"prefx": 2.0})


@pytest.mark.parametrize("name", list(METHODS))
def test_save_load_gives_equal_logits(name, tmp_path):
    model, methods, _ = adapted(name)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        assert (expected - tiny_llama()(ids).logits).abs().max() > 1e-3, "the method must change the output"
        combine.save_methods(methods, model, tmp_path)
        reloaded = LOADERS[type(methods[0]).peft_type].load(tiny_llama(), tmp_path)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in reloaded.parameters())


@pytest.mark.parametrize("name", list(METHODS))
def test_parameter_groups_are_the_trainable_parameters_at_their_rates(name):
    model, (method,), cfg = adapted(name)
    groups = method.parameter_groups(model)
    grouped = [id(p) for g in groups for p in g.params]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable) and trainable
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        if group.label == "lora_B":  # LoRA+: the B factors, and only they, at --loraplus-lr-ratio
            assert group.lr_ratio == 4.0 and all(".lora_B." in names[id(p)] for p in group.params)
        else:
            assert group.lr_ratio == 1.0 and not any(".lora_B." in names[id(p)] for p in group.params)
    lrs = {id(p): g["lr"] for g in make_optimizer(model, cfg, [method]).param_groups for p in g["params"]}
    for group in groups:
        for p in group.params:
            assert lrs[id(p)] == pytest.approx(cfg.lr * type(method).lr_ratio * group.lr_ratio)
    # --method-lr-ratio replaces the method's own ratio
    overridden = make_optimizer(model, run_config(name, method_lr_ratio={name: 3.0}), [method])
    rates = {round(g["lr"] / cfg.lr, 6) for g in overridden.param_groups}
    assert rates == {round(3.0 * g.lr_ratio, 6) for g in groups if g.params}


def test_a_trainable_parameter_no_method_claims_is_refused():
    model, methods, cfg = adapted("lora")
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(LorakitError, match="belong to no method .*lm_head"):
        optimizer_groups(methods, model, cfg.lr, {})


@pytest.mark.parametrize("name", list(METHODS))
def test_merge_is_exact_or_refused(name, tmp_path):
    model, methods, _ = adapted(name)
    combine.save_methods(methods, model, tmp_path)
    loaded = combine.load(tiny_llama(), tmp_path)
    ids = input_ids()
    with torch.no_grad():
        expected = loaded(ids).logits
        kind = LOADERS[type(methods[0]).peft_type]
        if not kind.mergeable:
            with pytest.raises(LorakitError, match="cannot be merged"):
                combine.merge_and_unload(loaded)
            with pytest.raises(LorakitError, match="cannot be merged"):
                kind.merge(loaded)
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)  # unchanged
            return
        merged = combine.merge_and_unload(loaded)
        assert not any(type(m).__module__.startswith("lorakit") for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_info_describes_every_method(name, tmp_path, capsys):
    model, methods, _ = adapted(name)
    combine.save_methods(methods, model, tmp_path)
    rows = dict(combine.describe_adapter(tmp_path))
    for key, value in EXPECTED_ROWS[name].items():
        assert rows[key] == value, key
    assert rows["base_model"] == "tiny-llama" and rows["file_bytes"] > 0
    if name not in ("pissa", "adalora"):  # those two are saved converted to a plain LoRA
        assert rows["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(rows))
    assert main(["info", str(tmp_path)]) == 0
    assert f"peft_type        {EXPECTED_ROWS[name]['peft_type']}" in capsys.readouterr().out


def test_info_on_a_combined_directory(tmp_path, capsys):
    model, methods, _ = adapted("lora+prefix")
    combine.save_methods(methods, model, tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["methods"] == "lora+prefix" and info["lora.r"] == 4 and info["prefix.num_virtual_tokens"] == 3
    assert info["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert [name for name, _ in combine.describe_methods(tmp_path)] == ["lora", "prefix"]
