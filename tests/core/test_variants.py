"""LoRA variants checked against PEFT: rsLoRA scaling, PiSSA initialization and its saved conversion, LoRA+."""
import copy

import torch
from conftest import input_ids, randomize_lora, tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig, apply
from lorakit.methods.lora import LoraMethod, LoraOptions
from lorakit.training.config import TrainConfig
from lorakit.training.loop import make_optimizer

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_config(**kw):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw})


def test_rslora_scaling_and_files_match_peft(tmp_path):
    from peft import PeftModel, get_peft_model

    base = tiny_llama()
    ids = input_ids()
    model = apply(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True))
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    layer, peft_layer = model.model.layers[0].self_attn.q_proj, theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == peft_layer.scaling["default"] == 8 / 4 ** 0.5
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(use_rslora=True, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_pissa_init_residual_and_saved_conversion_match_peft(tmp_path):
    from peft import PeftModel, get_peft_model

    base = tiny_llama()
    ids = input_ids()
    model = apply(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(init_lora_weights="pissa"))
    ours, theirs = model.model.layers[1].mlp.down_proj, peft_model.base_model.model.model.layers[1].mlp.down_proj
    A, B = ours.factors("default")
    torch.testing.assert_close(A, theirs.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(B, theirs.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-5)  # unchanged at init

    # PEFT's own conversion of a trained PiSSA adapter (rank 2r, for the original W) loads in lorakit ...
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "initial")
    randomize_lora(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "converted")
    torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    # ... and lorakit's save converts the same way, for PEFT on the original base.
    randomize_lora(model, seed=2)
    lorakit.save_adapter(model, tmp_path / "ours")
    on_original = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(on_original(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_loraplus_groups_and_step_match_peft():
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_gpt2()
    targets = ["c_attn", "c_fc"]
    model = apply(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model)
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(target_modules=targets))
    same_factors = {k.replace(".default", ".default.weight"): v for k, v in model.state_dict().items() if "lora_" in k}
    assert not peft_model.base_model.model.load_state_dict(same_factors, strict=False).unexpected_keys
    cfg = TrainConfig(lr=1e-3, lora=LoraOptions(loraplus_lr_ratio=16))
    ours = make_optimizer(model, cfg, [LoraMethod(cfg)])
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.0)

    def lr_by_factor(optimizer, named):
        names = {id(p): n for n, p in named}
        return {("B" if "lora_B" in names[id(p)] else "A", g["lr"]) for g in optimizer.param_groups for p in g["params"]}

    assert lr_by_factor(ours, model.named_parameters()) == lr_by_factor(theirs, peft_model.named_parameters()) \
        == {("A", 1e-3), ("B", 16e-3)}
    ids = input_ids()
    for m, optimizer in ((model, ours), (peft_model, theirs)):
        m(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
