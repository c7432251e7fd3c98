"""The per-row LoRA branch: both strategies give each row its own adapter's update (base rows none), equal to
a plain loop over rows, for mixed ranks, DoRA rows and any order of rows."""
from __future__ import annotations

import pytest
import torch

from lorakit.serve.adapters import AdapterWeights, GroupFactors
from lorakit.serve.lora_kernel import build_kernel, segments_kernel
from lorakit.serve.multi_lora import FusedPlan, GatherPlan, LoraBatch, OneAdapterPlan, RowFactors, SegmentPlan

LAYERS, D_IN, SIZES = 2, 12, (6, 4)  # a group of two projections, outputs side by side
D_OUT = sum(SIZES)


def adapter(name, ranks, dora=False, seed=0, d_in=D_IN, sizes=SIZES, dtype=torch.float32):
    """Random factors for a group of two projections with these ranks (0: the projection is not adapted)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(LAYERS, sum(ranks), d_in, generator=g)
    Bt = torch.zeros(LAYERS, sum(ranks), sum(sizes))
    row, col = 0, 0
    for rank, size in zip(ranks, sizes):  # block-diagonal: projection i's rank rows feed its own columns
        Bt[:, row:row + rank, col:col + size] = torch.randn(LAYERS, rank, size, generator=g)
        row, col = row + rank, col + size
    g_scale = 1 + 0.1 * torch.randn(LAYERS, sum(sizes), generator=g) if dora else None
    A, Bt, g_scale = (None if t is None else t.to(dtype) for t in (A, Bt, g_scale))
    return AdapterWeights(name, None, {"g": GroupFactors(A, Bt, g_scale, [True] * LAYERS, tuple(ranks), tuple(sizes))})


def compiled_kernel():
    kernel, reason = build_kernel()
    assert kernel is not None, reason  # CI has the compiler and ninja: a build failure is a failure
    return kernel


def reference(rows, x, out, layer):
    out = out.clone()
    for i, a in enumerate(rows):
        f = a.groups["g"]
        out[i] += x[i] @ f.A[layer].T @ f.Bt[layer]
        if f.g is not None:
            out[i] *= f.g[layer]
    return out


@pytest.mark.parametrize("strategy", ["gather", "segment", "fused"])
def test_each_row_gets_its_own_adapters_update(strategy):
    a, b, c = adapter("a", (2, 1), seed=1), adapter("b", (3, 0), dora=True, seed=2), adapter("c", (0, 4), seed=3)
    big = adapter("big", (7, 6), seed=5)
    rows = [b, a, a, c, b, a]
    factors = RowFactors({"g": (LAYERS, D_IN, SIZES)}, rows=8, dtype=torch.float32, device=torch.device("cpu"))
    factors.assign(6, big)  # a previous occupant: higher rank leftovers must not leak into row 0
    factors.move(6, 0)
    for slot, weights in enumerate(rows):
        factors.assign(slot, weights)
    factors.fit(list(range(len(rows))))  # the big adapter left: the blocks shrink to what the rows need
    assert factors.caps["g"] == (3, 4)
    plans = {"gather": lambda: GatherPlan(factors, rows), "segment": lambda: SegmentPlan(rows, torch.device("cpu")),
             "fused": lambda: FusedPlan(rows, compiled_kernel())}
    plan = plans[strategy]()
    x, base = torch.randn(len(rows) + 2, D_IN), torch.randn(len(rows) + 2, D_OUT)  # 2 trailing base rows
    for layer in range(LAYERS):
        out = base.clone()
        LoraBatch(plan, []).apply(layer, "g", x, out)
        torch.testing.assert_close(out[:len(rows)], reference(rows, x, base, layer)[:len(rows)])
        assert torch.equal(out[len(rows):], base[len(rows):])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_one_adapter_on_every_row_equals_the_loop(dora, fused):
    a = adapter("a", (3, 2), dora=dora, seed=6)
    a.groups["g"].present[0] = False  # a layer the adapter leaves alone
    a.groups["g"].A[0] = 0
    x, base = torch.randn(5, D_IN), torch.randn(5, D_OUT)
    plan = FusedPlan([a] * 3, compiled_kernel()) if fused else OneAdapterPlan(a, 3)  # rows 0..2 decode on the adapter, 3..4 are base rows
    for layer in range(LAYERS):
        out = base.clone()
        LoraBatch(plan, []).apply(layer, "g", x, out)
        expected = base if layer == 0 else reference([a] * 3, x, base, layer)
        torch.testing.assert_close(out[:3], expected[:3])
        assert torch.equal(out[3:], base[3:])
    out = base[:3].clone()  # every row decoding: the batch is exactly the plan's rows
    LoraBatch(plan, []).apply(1, "g", x[:3], out)
    torch.testing.assert_close(out, reference([a] * 3, x[:3], base[:3], 1))


def test_prefill_segments_use_their_adapter():
    a = adapter("a", (3, 2), dora=True, seed=4)
    x, base = torch.randn(7, D_IN), torch.randn(7, D_OUT)
    out = base.clone()
    LoraBatch(None, [(2, 5, a)]).apply(1, "g", x, out)
    torch.testing.assert_close(out[2:5], reference([a] * 3, x[2:5], base[2:5], 1))
    assert torch.equal(out[:2], base[:2]) and torch.equal(out[5:], base[5:])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-factors"])
def test_prefill_segments_in_one_compiled_call_equal_the_loop(dtypes):
    """lora_segments_ (one call for every prompt of a forward) against the same update in fp32, prompt by prompt:
    prompts shorter and longer than its 16-token blocks, mixed ranks, DoRA, a layer an adapter leaves alone, inputs
    and outputs that are not multiples of the vector widths (its masked tails), decoding rows before the prompts."""
    x_dtype, factor_dtype = dtypes
    d_in, sizes = 40, (20, 5)
    make = lambda name, ranks, **kw: adapter(name, ranks, d_in=d_in, sizes=sizes, dtype=factor_dtype, **kw)
    a, b, c = make("a", (2, 1), seed=1), make("b", (3, 0), dora=True, seed=2), make("c", (0, 4), seed=3)
    c.groups["g"].present[0] = False  # c leaves layer 0 alone
    c.groups["g"].A[0] = 0
    prompts = [(2, 3, a), (3, 20, b), (20, 36, c), (36, 71, a), (71, 88, b)]  # after 2 decoding rows
    x = torch.randn(90, d_in).to(x_dtype)  # 2 trailing rows of no prompt
    base = torch.randn(90, sum(sizes)).to(x_dtype)
    kernel = segments_kernel()
    assert kernel is not None  # CI has the compiler and ninja: a build failure is a failure
    for layer in range(LAYERS):
        out = base.clone()
        LoraBatch(None, prompts, kernel).apply(layer, "g", x, out)
        expected = base.float()
        for start, end, weights in prompts:
            f = weights.groups["g"]
            if f.present[layer]:
                update = x[start:end].float() @ f.A[layer].float().T @ f.Bt[layer].float()
                expected[start:end] += update
                if f.g is not None:
                    expected[start:end] *= f.g[layer].float()
        tolerance = {} if x_dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
        torch.testing.assert_close(out.float(), expected.to(x_dtype).float(), **tolerance)
        assert torch.equal(out[:2], base[:2]) and torch.equal(out[88:], base[88:])
        if layer == 0:
            assert torch.equal(out[20:36], base[20:36])
