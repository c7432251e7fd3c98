"""The compiled LoRA branch (lorakit.serve.lora_kernel) equals the same update as torch ops in fp32, for every
dtype pair it takes, per-row and shared factors, strided blocks, rank-0 blocks and strided rows; and the
engine's choice of kernel refuses what it cannot do with lorakit's error."""
from __future__ import annotations

import pytest
import torch

from lorakit import LorakitError
from lorakit.serve import lora_kernel
from lorakit.serve.lora_kernel import fused_update, pick, reference_update

D_IN, RANKS, WIDTHS = 40, (3, 0, 5), (24, 8, 17)  # three projections, the middle one not adapted


@pytest.fixture(scope="module")
def kernel():
    kernel, reason = fused_update()
    assert kernel is not None, reason  # CI has the compiler and ninja: a build failure is a failure
    return kernel


def operands(n_rows, shared, x_dtype, factor_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 1 if shared else n_rows
    A = torch.randn(rows, sum(RANKS), D_IN, generator=g).to(factor_dtype)
    # Bt blocks as views into one block-diagonal (rows, R, d_out) tensor, as the one-adapter plan passes them
    dense = torch.zeros(rows, sum(RANKS), sum(WIDTHS) + 3)
    blocks, first, col = [], 0, 0
    for rank, width in zip(RANKS, WIDTHS):
        dense[:, first:first + rank, col:col + width] = torch.randn(rows, rank, width, generator=g) * 0.1
        first, col = first + rank, col + width
    dense = dense.to(factor_dtype)
    first, col = 0, 0
    for rank, width in zip(RANKS, WIDTHS):
        blocks.append(dense[:, first:first + rank, col:col + width])
        first, col = first + rank, col + width
    wide = torch.randn(n_rows, D_IN + 7, generator=g).to(x_dtype)
    x = wide[:, 3:3 + D_IN]  # rows with a stride wider than d_in
    out = torch.randn(n_rows, sum(WIDTHS) + 5, generator=g).to(x_dtype)  # 5 columns past the blocks
    return x, A, blocks, out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("n_rows", [1, 6])
@pytest.mark.parametrize("x_dtype,factor_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_the_kernel_equals_torch_ops(kernel, n_rows, shared, x_dtype, factor_dtype):
    x, A, blocks, out = operands(n_rows, shared, x_dtype, factor_dtype)
    expected, got = out.clone(), out.clone()
    reference_update(x, A, blocks, expected)
    kernel(x, A, blocks, got)
    assert not torch.equal(got, out)  # B != 0: the update is not a no-op
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if x_dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, expected, **tolerance)
    assert torch.equal(got[:, sum(WIDTHS):], out[:, sum(WIDTHS):])  # columns past the blocks untouched
    assert torch.equal(got[:, 24:32], out[:, 24:32])  # the rank-0 projection's columns untouched


def test_the_kernel_checks_its_operands(kernel):
    x, A, blocks, out = operands(2, False, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="ranks must add up"):
        kernel(x, A, blocks[:1], out)
    with pytest.raises(RuntimeError, match="innermost"):
        kernel(x, A.transpose(1, 2).contiguous().transpose(1, 2), blocks, out)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel(x, A, blocks, out.double())


def test_pick_follows_the_choice_and_refuses_what_it_cannot_do(kernel, monkeypatch):
    cpu = torch.device("cpu")
    assert pick("torch", cpu, torch.bfloat16, torch.float32) is None
    assert pick("auto", cpu, torch.bfloat16, torch.float32) is kernel
    assert pick("auto", cpu, torch.float16, torch.float16) is None  # not a pair it takes: torch ops
    with pytest.raises(LorakitError, match="lora_kernel='fused' runs on the CPU"):
        pick("fused", cpu, torch.float16, torch.float16)
    monkeypatch.setattr(lora_kernel, "fused_update", lambda: (None, "CalledProcessError: no compiler"))
    assert pick("auto", cpu, torch.bfloat16, torch.float32) is None
    with pytest.raises(LorakitError, match="could not be built .*no compiler.*pip install ninja"):
        pick("fused", cpu, torch.bfloat16, torch.float32)
