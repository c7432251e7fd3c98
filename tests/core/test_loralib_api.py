"""`import lorakit as lora` runs loralib code, and checkpoints move between loralib and lorakit both ways."""
import loralib
import pytest
import torch
from conftest import randomize_lora
from torch import nn

import lorakit as lora
from lorakit import LorakitError


def _net(lib, fan_in_fan_out=False):
    """The same small network, built with loralib or lorakit."""
    torch.manual_seed(0)
    return nn.ModuleDict({
        "emb": lib.Embedding(30, 12, r=4, lora_alpha=8),
        "qkv": lib.MergedLinear(12, 36, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                fan_in_fan_out=fan_in_fan_out, merge_weights=False),
        "fc": lib.Linear(36, 12, r=4, lora_alpha=16, fan_in_fan_out=fan_in_fan_out, merge_weights=False),
        "conv": lib.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1, merge_weights=False),
    })


def _forward(net, ids, img):
    h = net["emb"](ids)
    return net["fc"](net["qkv"](h)), net["conv"](img)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("direction", ["loralib->lorakit", "lorakit->loralib"])
def test_state_dicts_interchange(direction, fan_in_fan_out):
    ids = torch.randint(0, 30, (2, 5))
    img = torch.randn(2, 3, 6, 6)
    src_lib, dst_lib = (loralib, lora) if direction == "loralib->lorakit" else (lora, loralib)
    src, dst = _net(src_lib, fan_in_fan_out), _net(dst_lib, fan_in_fan_out)
    randomize_lora(src)
    src.train(False) if src_lib is lora else src.train(True)  # loralib: stay unmerged for the comparison
    sd = src.state_dict()
    assert set(sd) == set(dst.state_dict()), "key names must be loralib's"
    dst.load_state_dict(sd)
    out_src, out_dst = _forward(src, ids, img), _forward(dst, ids, img)
    for a, b in zip(out_src, out_dst):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (sd["fc.lora_B"] != 0).any()


# One deliberate difference: loralib's conv layers hide their bias in `.conv`, so its bias="lora_only"
# skips them; lorakit treats every LoRA-adapted layer's bias alike.
LORALIB_SKIPS = {"conv.conv.bias"}


def test_lora_state_dict_matches_loralib():
    ours, theirs = _net(lora), _net(loralib)
    for bias in ("none", "all"):
        assert set(lora.lora_state_dict(ours, bias=bias)) == set(loralib.lora_state_dict(theirs, bias=bias)), bias
    assert set(lora.lora_state_dict(ours, bias="lora_only")) == set(
        loralib.lora_state_dict(theirs, bias="lora_only")) | LORALIB_SKIPS


def test_lora_checkpoint_loads_with_strict_false():
    """loralib's workflow: a pretrained checkpoint, then the small LoRA checkpoint, strict=False."""
    a, b = _net(lora), _net(lora)
    randomize_lora(a)
    missing, unexpected = b.load_state_dict(lora.lora_state_dict(a), strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    ids = torch.randint(0, 30, (2, 5))
    img = torch.randn(2, 3, 6, 6)
    b.load_state_dict(a.state_dict())
    for x, y in zip(_forward(a, ids, img), _forward(b, ids, img)):
        torch.testing.assert_close(x, y)


def test_mark_only_lora_as_trainable_matches_loralib():
    for bias in ("none", "all", "lora_only"):
        ours, theirs = _net(lora), _net(loralib)
        lora.mark_only_lora_as_trainable(ours, bias=bias)
        loralib.mark_only_lora_as_trainable(theirs, bias=bias)
        # parameter names differ (ours nest: fc.lora_A.default); compare the trainable shapes
        ours_trainable = sorted(tuple(p.shape) for p in ours.parameters() if p.requires_grad)
        theirs_trainable = [p for n, p in theirs.named_parameters() if p.requires_grad]
        if bias == "lora_only":
            theirs_trainable.append(theirs["conv"].conv.bias)
        assert ours_trainable == sorted(tuple(p.shape) for p in theirs_trainable), bias


def test_training_loop_from_loralib_readme():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 16, r=4, lora_alpha=8), nn.ReLU(), lora.Linear(16, 1, r=4, lora_alpha=8))
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    opt = torch.optim.Adam(lora.lora_parameters(model), lr=1e-2)
    frozen = model[0].weight.detach().clone()
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    first = None
    for _ in range(30):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert torch.equal(model[0].weight, frozen)
    assert len(lora.lora_parameters(model)) == 4


def test_eval_never_changes_weights():
    layer = lora.Linear(6, 6, r=2, lora_alpha=2, merge_weights=True)
    randomize_lora(layer)
    W = layer.weight.detach().clone()
    layer.eval()
    layer.train()
    assert torch.equal(layer.weight, W)


def test_r_zero_is_a_plain_layer():
    layer = lora.Linear(4, 5, r=0)
    assert set(layer.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("fn", [lora.mark_only_lora_as_trainable, lora.lora_parameters, lora.lora_state_dict])
def test_model_without_lora_gets_clear_error(fn):
    with pytest.raises(LorakitError, match=r"no LoRA layer.*lora\.Linear.*lorakit\.apply"):
        fn(nn.Linear(4, 4))


def test_bad_bias_value():
    with pytest.raises(LorakitError, match="bias"):
        lora.mark_only_lora_as_trainable(_net(lora), bias="some")
