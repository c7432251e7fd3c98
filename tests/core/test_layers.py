"""LoRA layers: the forward equals W x + scaling B A x, merge == unmerged, unmerge restores W exactly."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora
from torch import nn

from lorakit import LorakitError
from lorakit.core.layers import Conv, Embedding, Linear, MergedLinear, TransposedLinear


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return Linear(nn.Linear(10, 6)), torch.randn(3, 4, 10)
    if kind == "transposed":
        return Linear(TransposedLinear(10, 6)), torch.randn(3, 4, 10)
    if kind == "embedding":
        return Embedding(nn.Embedding(20, 6, padding_idx=0)), torch.randint(0, 20, (3, 5))
    if kind == "conv1d":
        return Conv(nn.Conv1d(3, 5, 3, padding=1)), torch.randn(2, 3, 9)
    if kind == "conv2d":
        return Conv(nn.Conv2d(3, 5, 3, stride=2, padding=1)), torch.randn(2, 3, 8, 8)
    if kind == "merged":
        return MergedLinear(nn.Linear(10, 12), [True, False, True]), torch.randn(3, 4, 10)
    raise AssertionError(kind)


KINDS = ["linear", "transposed", "embedding", "conv1d", "conv2d", "merged"]


@pytest.mark.parametrize("kind", KINDS)
def test_new_adapter_starts_at_base(kind):
    layer, x = _layer(kind)
    base_out = layer.base_layer(x)
    layer.add_adapter("default", r=4, lora_alpha=8)
    assert torch.equal(layer(x), base_out)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_dense_update(kind):
    """y = base(x) + forward of (W + delta) - base: the branch equals the dense update's effect."""
    layer, x = _layer(kind)
    layer.add_adapter("default", r=4, lora_alpha=8)
    randomize_lora(layer)
    delta = layer.delta_weight("default")
    assert delta.abs().max() > 0
    W = layer.base_layer.weight
    with torch.no_grad():
        expected_weight = W + delta
        if kind in ("linear", "merged"):
            expected = F.linear(x, expected_weight, layer.base_layer.bias)
        elif kind == "transposed":
            expected = x @ expected_weight + layer.base_layer.bias
        elif kind == "embedding":
            expected = F.embedding(x, expected_weight, padding_idx=0)
        else:
            expected = layer.base_layer._conv_forward(x, expected_weight, layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_and_unmerge_restores_exactly(kind):
    layer, x = _layer(kind)
    layer.add_adapter("default", r=4, lora_alpha=8)
    randomize_lora(layer)
    W0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, W0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(LorakitError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W0)
    assert torch.equal(layer(x), unmerged)


def test_scaling_and_rslora():
    layer = Linear(nn.Linear(8, 8))
    layer.add_adapter("a", r=4, lora_alpha=16)
    layer.add_adapter("b", r=4, lora_alpha=16, use_rslora=True)
    assert layer.scaling == {"a": 4.0, "b": 8.0}


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 16))
    layer.add_adapter("default", r=4, lora_alpha=4, lora_dropout=0.5)
    x = torch.randn(4, 16)
    layer.train()
    # B = 0: the base path never sees dropout, so outputs equal the base exactly even in train mode.
    assert torch.equal(layer(x), layer.base_layer(x))
    randomize_lora(layer)
    assert not torch.equal(layer(x), layer(x))  # dropout is live on the branch
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert isinstance(Linear(nn.Linear(4, 4)).lora_dropout, nn.ModuleDict)


def test_no_dropout_module_at_zero():
    layer = Linear(nn.Linear(4, 4))
    layer.add_adapter("default", r=2, lora_alpha=2)
    assert isinstance(layer.lora_dropout["default"], nn.Identity)


def test_init_modes():
    for init, b_zero in [(True, True), ("gaussian", True), (False, False)]:
        layer = Linear(nn.Linear(8, 8))
        layer.add_adapter("default", r=2, lora_alpha=2, init=init)
        A, B = layer.factors("default")
        assert A.abs().sum() > 0
        assert bool((B == 0).all()) == b_zero


def test_pissa_keeps_output_and_uses_top_singular_directions():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = Linear(base)
    x = torch.randn(5, 12)
    before = base(x).detach()
    W0 = base.weight.detach().clone()
    layer.add_adapter("default", r=3, lora_alpha=6, init="pissa")
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    # the adapter holds the top-3 singular part of W
    S = torch.linalg.svdvals(W0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight("default"))[:3], S[:3], atol=1e-4, rtol=1e-4)


def test_lora_factors_stay_fp32_over_bf16_base():
    layer = Linear(nn.Linear(8, 8).to(torch.bfloat16))
    layer.add_adapter("default", r=2, lora_alpha=2)
    assert layer.lora_A["default"].dtype == torch.float32
    randomize_lora(layer)
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B["default"].grad is not None and layer.lora_B["default"].grad.dtype == torch.float32


def test_merge_refuses_nan():
    layer = Linear(nn.Linear(4, 4))
    layer.add_adapter("default", r=2, lora_alpha=2)
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].fill_(float("nan"))
    with pytest.raises(LorakitError, match="NaN"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, W0)
    assert layer.merged_adapters == []


def test_two_adapters_add_up():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(8, 8))
    layer.add_adapter("a", r=2, lora_alpha=2)
    layer.add_adapter("b", r=3, lora_alpha=6)
    randomize_lora(layer)
    x = torch.randn(2, 8)
    both = layer(x)
    layer.active_adapters = ["a"]
    only_a = layer(x)
    layer.active_adapters = ["b"]
    only_b = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(both - base, (only_a - base) + (only_b - base), atol=1e-6, rtol=1e-5)


def test_merged_linear_leaves_disabled_slice_alone():
    layer, x = _layer("merged")
    layer.add_adapter("default", r=2, lora_alpha=2)
    randomize_lora(layer)
    delta = layer.delta_weight("default")
    assert delta[:4].abs().sum() > 0 and delta[8:].abs().sum() > 0
    assert torch.equal(delta[4:8], torch.zeros(4, 10))


def test_grouped_conv_refused():
    with pytest.raises(LorakitError, match="groups"):
        Conv(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("tokens", [2, 64])  # a decoding step (fp32 branch on CPU) and a prompt (cached casts)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_follows_every_update(tokens, dtype):
    """In eval mode under no_grad the factors are cached; each way of changing them must show."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(10, 6).to(dtype))
    x = torch.randn(1, tokens, 10, dtype=dtype)
    layer.add_adapter("default", r=4, lora_alpha=8)
    randomize_lora(layer)
    layer.eval()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)

    def check():  # against the grad-enabled training path, which never caches
        with torch.enable_grad():
            expected = layer(x).detach()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, **tol)

    check()
    with torch.no_grad():
        layer.lora_B["default"].mul_(-2)  # an in-place write (as an optimizer step or a load)
    check()
    layer.scaling["default"] = 0.5
    check()
    layer.lora_A["default"].data.copy_(torch.randn_like(layer.lora_A["default"]))  # bypasses the version counter
    layer.train()
    layer.eval()  # ... so a mode switch clears the cache
    check()
    opt = torch.optim.SGD([layer.lora_A["default"], layer.lora_B["default"]], lr=0.5)
    layer(x).float().square().sum().backward()
    opt.step()
    check()
    layer.to(torch.float64)
    x = x.double()
    tol = dict(atol=1e-10, rtol=1e-10)
    check()
