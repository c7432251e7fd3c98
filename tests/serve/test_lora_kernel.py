"""The compiled LoRA kernel (lorakit.serve.lora_kernel) equals the same update as torch ops in fp32, for every
dtype pair it takes, DoRA's scale, a projection left unadapted, a layer left alone, rows in any order and rows
with a stride wider than d_in; it refuses malformed operands; and the engine's choice of strategy refuses
what it cannot do with lorakit's error."""
from __future__ import annotations

import pytest
import torch

from lorakit import LorakitError
from lorakit.serve import lora_kernel
from lorakit.serve.adapters import GroupFactors
from lorakit.serve.lora_kernel import build_kernel, kernel_table, pick

LAYERS, D_IN, WIDTHS = 2, 40, (24, 8, 17)  # three projections side by side


@pytest.fixture(scope="module")
def kernel():
    kernel, reason = build_kernel()
    assert kernel is not None, reason  # CI has the compiler and ninja: a build failure is a failure
    return kernel


def factors(ranks, dtype, dora=False, seed=0, present=(True, True)):
    """One adapter's factors for the group, Bt block-diagonal (projection i's rows feed its own columns)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(LAYERS, sum(ranks), D_IN, generator=g)
    Bt = torch.zeros(LAYERS, sum(ranks), sum(WIDTHS))
    first, col = 0, 0
    for rank, width in zip(ranks, WIDTHS):
        Bt[:, first:first + rank, col:col + width] = 0.1 * torch.randn(LAYERS, rank, width, generator=g)
        first, col = first + rank, col + width
    scale = 1 + 0.1 * torch.randn(LAYERS, sum(WIDTHS), generator=g) if dora else None
    return GroupFactors(A.to(dtype), Bt.to(dtype), None if scale is None else scale.to(dtype), list(present),
                        tuple(ranks), WIDTHS)


def reference(rows, x, out, layer):
    """out[i] += x[i] A^T Bt, then *= g, in fp32, for each (row, factors)."""
    expected = out.float()
    for i, f in rows:
        if f.present[layer]:
            expected[i] += x[i].float() @ f.A[layer].float().T @ f.Bt[layer].float()
            if f.g is not None:
                expected[i] *= f.g[layer].float()
    return expected.to(out.dtype)


def table(rows, layer):
    lines = torch.stack([kernel_table(f)[layer] for _, f in rows])
    lines[:, 0] = torch.tensor([i for i, _ in rows])
    return lines


@pytest.mark.parametrize("x_dtype,factor_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_the_kernel_equals_torch_ops(kernel, x_dtype, factor_dtype):
    a = factors((3, 0, 5), factor_dtype, seed=1)  # the middle projection not adapted
    b = factors((2, 4, 1), factor_dtype, dora=True, seed=2)
    c = factors((1, 1, 1), factor_dtype, seed=3, present=(False, True))  # leaves layer 0 alone
    rows = [(4, b), (0, a), (2, a), (1, c), (5, b)]  # row 3 and 6 on the base; rows not in order
    wide = torch.randn(7, D_IN + 7).to(x_dtype)
    x = wide[:, 3:3 + D_IN]  # rows with a stride wider than d_in
    base = torch.randn(7, sum(WIDTHS)).to(x_dtype)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if x_dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2}
    for layer in range(LAYERS):
        out = base.clone()
        kernel(x, out, table(rows, layer), list(WIDTHS), factor_dtype == torch.bfloat16)
        expected = reference(rows, x, base, layer)
        torch.testing.assert_close(out, expected, **tolerance)
        assert torch.equal(out[[3, 6]], base[[3, 6]])  # base rows untouched
        assert torch.equal(out[0, 24:32], base[0, 24:32])  # the unadapted projection's columns untouched
        assert not torch.equal(out[0], base[0])  # B != 0: the update is not a no-op
        assert torch.equal(out[1], base[1]) == (layer == 0)


def test_the_kernel_checks_its_operands(kernel):
    f = factors((3, 0, 5), torch.float32)
    x, out = torch.randn(2, D_IN), torch.zeros(2, sum(WIDTHS))
    lines = table([(0, f), (1, f)], 0)
    with pytest.raises(RuntimeError, match="widths must add up"):
        kernel(x, out, lines, [24, 8, 16], False)
    with pytest.raises(RuntimeError, match="row index is out of range"):
        kernel(x[:1], out[:1], lines, list(WIDTHS), False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel(x, out.double(), lines, list(WIDTHS), False)
    with pytest.raises(RuntimeError, match="fp32 with fp32 factors"):
        kernel(x, out, lines, list(WIDTHS), True)


def test_pick_follows_the_strategy_and_refuses_what_it_cannot_do(kernel, monkeypatch):
    cpu = torch.device("cpu")
    assert pick("gather", cpu, torch.bfloat16, torch.float32) is None
    assert pick("auto", cpu, torch.bfloat16, torch.float32) is kernel
    assert pick("auto", cpu, torch.float16, torch.float16) is None  # not a pair it takes: torch ops
    with pytest.raises(LorakitError, match="lora_strategy='fused' runs on the CPU"):
        pick("fused", cpu, torch.float16, torch.float16)
    monkeypatch.setattr(lora_kernel, "build_kernel", lambda: (None, "CalledProcessError: no compiler"))
    assert pick("auto", cpu, torch.bfloat16, torch.float32) is None
    with pytest.raises(LorakitError, match="could not be built .*no compiler.*pip install ninja"):
        pick("fused", cpu, torch.bfloat16, torch.float32)
