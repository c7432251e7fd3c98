"""Several methods in one model: trained together, saved and loaded together, merged where possible."""
import json

import pytest
import torch
from conftest import input_ids, tiny_llama

from lorakit import LorakitError
from lorakit.cli.main import main
from lorakit.core import io
from lorakit.methods import combine, prefix
from lorakit.methods.registry import make_methods
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import build_config
from lorakit.training.loop import make_optimizer


def _combined(method, **cfg):
    # LoRA on q/o: disjoint from IA3's defaults (k, v, down)
    cfg = build_config(TrainConfig, {"method": method, "target_modules": ["q_proj", "o_proj"], "num_virtual_tokens": 3, **cfg})
    model = tiny_llama()
    methods = make_methods(cfg)
    combine.apply_methods(methods, model, "tiny")
    return model, methods, cfg


def test_two_methods_train_together_and_reload(tmp_path):
    from peft import PeftModel

    model, methods, cfg = _combined("lora+prefix", lr=1e-2)
    owned = {m.name: [p for g in m.parameter_groups(model) for p in g.params] for m in methods}
    assert list(owned) == ["lora", "prefix"] and all(p.requires_grad for ps in owned.values() for p in ps)
    optimizer = make_optimizer(model, cfg, methods)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(owned["prefix"][0])] == pytest.approx(cfg.lr * prefix.PrefixMethod.lr_ratio)
    start = prefix.prefix_encoder(model).prompt_embeddings.detach().clone()
    ids = input_ids()
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(layer.lora_B["default"].abs().sum() > 0 for layer in model.modules() if hasattr(layer, "lora_B"))
    assert not torch.equal(prefix.prefix_encoder(model).prompt_embeddings, start)

    combine.save_methods(methods, model, tmp_path)
    manifest = json.loads((tmp_path / combine.MANIFEST).read_text())
    assert manifest["methods"] == [{"name": "lora", "path": "."}, {"name": "prefix", "path": "prefix"}]
    reloaded = combine.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())
    resumed = combine.load(tiny_llama(), tmp_path, is_trainable=True)
    assert {n.split(".")[-2] for n, p in resumed.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "prefix_tuning"}
    # PEFT's layout: PEFT reads the root part (the LoRA) as a plain LoRA adapter.
    lora_only = io.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(), tmp_path)(ids).logits, lora_only(ids).logits,
                               rtol=1e-6, atol=1e-6)


def test_merge_where_the_math_allows_and_refuse_where_not():
    model, _, _ = _combined("lora+ia3")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "ia3_l" in name:
                param.add_(0.1 * torch.randn_like(param))
    ids = input_ids()
    expected = model(ids).logits
    merged = combine.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("lorakit") for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)

    model, _, _ = _combined("lora+prefix")
    with pytest.raises(LorakitError, match=r"a prefix \(prefix tuning\), which cannot be merged"):
        combine.merge_and_unload(model)
    assert prefix.prefix_encoder(model) is not None and any(hasattr(m, "lora_A") for m in model.modules())


def test_overlapping_targets_are_refused():
    with pytest.raises(LorakitError, match="disjoint target modules"):
        _combined("ia3+lora", target_modules=["all-linear"])
    with pytest.raises(LorakitError, match="disjoint target modules"):
        _combined("lora+ia3", target_modules=["k_proj"])
    with pytest.raises(LorakitError, match="one of them per model"):
        _combined("prefix+prompt")


def test_cli_train_and_merge_refusal(tiny_model_dir, task_files, tmp_path, capsys):
    train, _ = task_files
    out = tmp_path / "run"
    fast = ["--eval-samples", "2", "--max-new-tokens", "4", "--precision", "fp32", "--warmup-steps", "1"]
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--output", str(out), *fast,
                 "--max-steps", "2", "--batch-size", "2", "--method", "lora+adapter"]) == 0
    assert (out / "adapter" / combine.MANIFEST).is_file() and (out / "adapter" / "adapter" / "adapter_config.json").is_file()
    assert main(["merge", "--adapter", str(out / "adapter"), "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "merged")]) == 1
    assert "bottleneck adapters, which cannot be merged" in capsys.readouterr().err
