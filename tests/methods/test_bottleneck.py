"""Bottleneck adapters: identity at init, placement, save -> load, training moves them, no merge, removal."""
import copy

import pytest
import torch
from conftest import input_ids, tiny_gpt2, tiny_llama

from lorakit import LorakitError
from lorakit.methods import bottleneck, combine


@pytest.mark.parametrize("make, attention", [(tiny_llama, "self_attn"), (tiny_gpt2, "attn")])
def test_identity_at_init_placement_and_reload(make, attention, tmp_path):
    base = make()
    ids = input_ids()
    model = bottleneck.apply(copy.deepcopy(base), bottleneck.BottleneckConfig(bottleneck_size=4))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    hosts = [name.rsplit(".", 1)[-1] for name, _ in bottleneck.bottlenecks(model)]
    assert hosts == [attention, "mlp"] * 2
    only_mlp = bottleneck.apply(make(), bottleneck.BottleneckConfig(bottleneck_size=4, placement="mlp"))
    assert [n.rsplit(".", 1)[-1] for n, _ in bottleneck.bottlenecks(only_mlp)] == ["mlp", "mlp"]

    model = bottleneck.apply(copy.deepcopy(base), bottleneck.BottleneckConfig(bottleneck_size=4, init_weights=False))
    changed = model(ids).logits
    assert not torch.allclose(changed, base(ids).logits)
    bottleneck.save(model, tmp_path)
    reloaded = bottleneck.load(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, changed, rtol=0, atol=0)
    bottleneck.remove(reloaded)
    torch.testing.assert_close(reloaded(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_only_adapters_train_and_they_move():
    model = bottleneck.apply(tiny_llama(), bottleneck.BottleneckConfig(bottleneck_size=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bottleneck." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids()
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(adapter.up_weight.abs().sum() > 0 for _, adapter in bottleneck.bottlenecks(model))


def test_merge_is_refused_and_bad_configs():
    model = bottleneck.apply(tiny_llama(), bottleneck.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(LorakitError, match="bottleneck adapters, which cannot be merged"):
        combine.merge_and_unload(model)
    with pytest.raises(LorakitError, match="placement"):
        bottleneck.BottleneckConfig(placement="everywhere")
    with pytest.raises(LorakitError, match="matched no module"):
        bottleneck.apply(tiny_llama(), bottleneck.BottleneckConfig(target_modules=["nope"]))
