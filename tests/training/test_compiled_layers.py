"""Regional torch.compile of the decoder layers (`--compile`): same loss and gradients as eager, one graph
for all layers, eager outside training, and the per-machine measurement behind `--compile auto`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import randomize_lora, tiny_llama

import lorakit
from lorakit.core import autotune
from lorakit.core.errors import LorakitError
from lorakit.training.compiled_layers import (
    adapter_kinds,
    attention_kind,
    compile_layers,
    compile_pays,
    decoder_layers,
    restore_eager,
    should_compile,
)
from lorakit.training.loss import loss_sum


def _adapted(layers: int = 2, dora: bool = False):
    model = tiny_llama()
    if layers != 2:
        from transformers import LlamaForCausalLM

        model.config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = LlamaForCausalLM(model.config).eval()
    model = lorakit.apply(model, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize_lora(model)
    return model.train()


def _loss_and_grads(model, ids, mask):
    total, n = loss_sum(model, ids, mask, ids)
    (total / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total.detach(), grads


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the mask reaches the compiled layers
    return ids, mask


@pytest.mark.parametrize("dora", [False, True])
def test_compiled_layers_give_eager_loss_and_gradients(dora):
    torch._dynamo.reset()
    model = _adapted(dora=dora)
    ids, mask = _batch()
    eager_loss, eager_grads = _loss_and_grads(model, ids, mask)
    assert compile_layers(model) == 2
    compiled_loss, compiled_grads = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and any("lora_B" in k for k in eager_grads)
    assert not dora or any("lora_magnitude_vector" in k for k in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # a copy's layers call their own weights, not the original's
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    twin_loss, _ = _loss_and_grads(twin, ids, mask)
    assert not torch.allclose(twin_loss, compiled_loss)
    restore_eager(model)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


def test_one_graph_serves_every_layer_and_generation_stays_eager():
    from torch._dynamo.utils import counters

    ids, mask = _batch()
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = _adapted(layers)
        compile_layers(model)
        _loss_and_grads(model, ids, mask)
        graphs[layers] = counters["stats"]["unique_graphs"]
        # evaluation and generation (KV cache, no grad) run the eager forward: no new graph
        model.eval()
        expected = copy.deepcopy(model)
        restore_eager(expected)
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert counters["stats"]["unique_graphs"] == graphs[layers]
        assert torch.equal(out, expected.generate(ids[:1], max_new_tokens=4, do_sample=False))
    assert graphs[2] == graphs[4] >= 1


def test_auto_compiles_only_where_it_can_pay():
    model = _adapted()
    cpu = torch.device("cpu")
    common = dict(steps=1000, tokens=16, dtype=torch.float32, single_process=True, plain_layers=True)
    assert should_compile("on", model, device=cpu, **common)
    assert not should_compile("off", model, device=cpu, **common)
    # a tiny model never repays the compile: auto does not even measure it
    assert not should_compile("auto", model, device=cpu, **common)
    with pytest.raises(LorakitError, match="--compile off"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_auto_measures_once_per_machine_and_leaves_training_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    autotune.forget_process_decisions()
    torch._dynamo.reset()
    model = _adapted()
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    chose = compile_pays(model, tokens=16, dtype=torch.float32)
    assert torch.equal(torch.rand(3), expected_draw)  # the measured passes did not move the RNG
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
    entries = json.loads((tmp_path / "autotune.json").read_text())[autotune.machine_key()]
    (key, entry), = [(k, v) for k, v in entries.items() if k.startswith("layer_compile[LlamaDecoderLayer L2 d32 t16")]
    assert key.endswith(" Linear sdpa]")  # the adapter's layer class and the attention function are in the key
    assert set(entry["seconds"]) == {"eager", "compiled"} and (entry["choice"] == "compiled") == chose
    autotune.forget_process_decisions()
    monkeypatch.setattr(autotune, "_seconds", lambda *a, **k: pytest.fail("measured again"))
    assert compile_pays(model, tokens=16, dtype=torch.float32) == chose
    autotune.forget_process_decisions()


def test_the_compile_decision_is_kept_per_adapter_kind():
    # DoRA's layers fuse differently from LoRA's: a decision measured on one must not serve the other
    lora_layer = decoder_layers(_adapted())[0]
    dora = lorakit.apply(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    assert adapter_kinds(lora_layer) == "Linear"
    assert adapter_kinds(decoder_layers(dora)[0]) == "DoraLinear"
    assert adapter_kinds(decoder_layers(tiny_llama())[0]) == "plain"


def test_the_compile_decision_is_kept_per_attention_function(monkeypatch):
    # lorakit's CPU attention changes what the layer computes between its products: its own decision
    from lorakit.training import attention

    model = tiny_llama().to(torch.bfloat16)
    assert attention_kind(model) == "sdpa"
    assert attention.use_fast_cpu_attention(model, measure=False)
    assert attention_kind(model) == f"lorakit_cpu q{attention.QUERY_BLOCK}"
    monkeypatch.setattr(attention, "QUERY_BLOCK", 64)
    assert attention_kind(model) == "lorakit_cpu q64"


def test_a_dora_layer_compiles_into_one_graph():
    # a graph break in each DoRA module (its cache of the frozen weight's row norms compares data pointers)
    # made the compiled DoRA layers slower than eager
    model = _adapted(dora=True)
    layer = decoder_layers(model)[0]
    x = torch.randn(1, 8, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(x, torch.arange(8)[None])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(type(layer).forward)(layer, x, position_embeddings=cos_sin, attention_mask=None)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
