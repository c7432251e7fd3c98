"""Adapters laid out for serving: the stacked factors hold each module's exact update (rank/alpha patterns,
rsLoRA, DoRA's scale), unsupported adapters are refused with a reason, and the store is a bounded LRU."""
from __future__ import annotations

import json

import pytest
import torch
from serve_fixtures import ADAPTERS, adapter_dirs, base_model, write_adapter  # noqa: F401 (fixture)

import lorakit
from lorakit import LorakitError
from lorakit.core.active import lora_layers
from lorakit.serve.adapters import AdapterStore, read_adapter
from lorakit.serve.llama import LlamaRunner


def read(runner, directory, name="a"):
    return read_adapter(name, directory, runner.layout, runner.base_weight, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_each_module_block_is_the_modules_update(tiny_model_dir, adapter_dirs, name):
    runner = LlamaRunner(base_model(tiny_model_dir), max_rows=1, max_seq_len=8)
    weights = read(runner, adapter_dirs[name])
    model = lorakit.load_adapter(base_model(tiny_model_dir), adapter_dirs[name])
    layers = dict(lora_layers(model))
    checked = 0
    for index, groups in enumerate(runner.layout):
        for layout in groups:
            factors = weights.groups.get(layout.name)
            delta = torch.zeros(layout.out_features, layout.in_features) if factors is None else \
                factors.Bt[index].T @ factors.A[index]  # the fused group's (d_out, d_in) update
            col = 0
            for module, width in zip(layout.modules, layout.out_sizes):
                layer = layers.get(module)
                block = delta[col:col + width]
                if layer is None:
                    assert torch.count_nonzero(block) == 0
                else:
                    expected = (layer.factors("default")[1] @ layer.factors("default")[0]) * layer.scaling["default"]
                    torch.testing.assert_close(block, expected, rtol=1e-5, atol=1e-6)
                    if hasattr(layer, "lora_magnitude_vector"):
                        g = layer.lora_magnitude_vector["default"] / layer.weight_norm("default")
                        torch.testing.assert_close(factors.g[index, col:col + width], g, rtol=1e-5, atol=1e-6)
                    checked += 1
                col += width
    assert checked == len(layers) > 0


@pytest.mark.parametrize("config,message", [
    (dict(target_modules=["q_proj", "embed_tokens"]), "not a LoRA factor of a decoder layer"),
    (dict(target_modules=["q_proj"], bias="lora_only"), "trained biases"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_adapters_the_engine_cannot_serve_are_refused(tiny_model_dir, tmp_path, config, message):
    base = base_model(tiny_model_dir)
    write_adapter(base, tmp_path / "a", "lorakit", dict(r=2, **config), seed=1)
    with pytest.raises(LorakitError, match=message):
        read(LlamaRunner(base, max_rows=1, max_seq_len=8), tmp_path / "a")


def test_an_adapter_for_another_base_is_refused(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    write_adapter(wider, tmp_path / "other", "lorakit", dict(r=2, target_modules=["q_proj"]), seed=1)
    with pytest.raises(LorakitError, match="trained on another base model"):
        read(LlamaRunner(base_model(tiny_model_dir), max_rows=1, max_seq_len=8), tmp_path / "other")


def test_a_rank_that_contradicts_the_config_is_refused(tiny_model_dir, adapter_dirs, tmp_path):
    import shutil

    shutil.copytree(adapter_dirs["r4"], tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(LorakitError, match="rank 4 in the file but its config says 3"):
        read(LlamaRunner(base_model(tiny_model_dir), max_rows=1, max_seq_len=8), tmp_path / "a")


class _Fake:
    def __init__(self):
        self.reads = []

    def __call__(self, name, directory):
        from lorakit.serve.adapters import AdapterWeights

        self.reads.append(name)
        return AdapterWeights(name, directory, {})


def test_the_store_drops_the_least_recently_used_adapter_no_request_uses():
    reader = _Fake()
    store = AdapterStore(reader, max_loaded=2)
    for name in "abc":
        store.register(reader(name, f"/{name}"))
    assert list(store.loaded) == ["b", "c"] and list(store.directories) == ["a", "b", "c"]
    b = store.acquire("b")  # b pinned, now the most recent
    a = store.acquire("a")  # read again; c (unpinned, least recent) is dropped
    assert reader.reads[-1] == "a" and list(store.loaded) == ["b", "a"]
    assert store.acquire("c") is None  # both in memory are in use: the request waits
    store.release(b)
    assert store.acquire("c") is not None and list(store.loaded) == ["a", "c"]
    store.unregister("a")
    assert a.pins == 1 and "a" not in store.loaded  # the running request keeps its reference
    with pytest.raises(LorakitError, match="no adapter named 'a'"):
        store.acquire("a")
    with pytest.raises(LorakitError, match="already loaded"):
        store.register(reader("b", "/b"))
