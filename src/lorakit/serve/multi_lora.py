"""The LoRA branch of a batch whose rows use different adapters.

The base GEMM of a projection group runs once for every token of the batch; this module adds each row's
update `x A^T Bt` (and DoRA's per-row scale) in place. Two ways for the decoding rows, chosen by
`EngineConfig.lora_strategy`:

* **gather** (Punica's BGMV, vLLM's bmm path): each batch row has its own copy of its adapter's factors in
  preallocated per-row buffers (copied in when the request joins, not per step), zero-padded to the largest
  rank in the batch, and the whole batch runs as two batched matmuls per group: a fixed number of kernel
  calls whatever the mix of adapters, but rows on the same adapter read its factors once each.
* **segment** (S-LoRA/Punica's SGMV as a loop): rows are grouped by adapter and each group runs two plain
  GEMMs on its own factors: each adapter's factors are read once, at two calls per adapter in the batch.

Rows on the base model sit after the adapter rows (the engine keeps that order) and skip the branch.
Newly admitted prompts (prefill) are one contiguous segment each and always run segment-wise.
"""
from __future__ import annotations

import torch

from lorakit.serve.adapters import AdapterWeights, GroupFactors


class RowFactors:
    """Per-row copies of the running rows' factors: for each group, A (layers, rows, R_cap, d_in) and
    Bt (layers, rows, R_cap, d_out), plus DoRA's g (layers, rows, d_out) once a DoRA adapter runs.
    R_cap grows to the largest rank seen; a row of lower rank is zero beyond its own.

    Args:
        dims: {group: (layers, d_in, d_out)}.
        rows: slots (the KV cache's, its spare included).
        dtype, device: the factors'.
    """

    def __init__(self, dims: dict[str, tuple[int, int, int]], rows: int, dtype: torch.dtype, device: torch.device):
        self.dims, self.rows, self.to = dims, rows, dict(dtype=dtype, device=device)
        self.A = {g: torch.zeros(n, rows, 0, d_in, **self.to) for g, (n, d_in, _) in dims.items()}
        self.Bt = {g: torch.zeros(n, rows, 0, d_out, **self.to) for g, (n, _, d_out) in dims.items()}
        self.g: dict[str, torch.Tensor] = {}
        self.rank = {g: [0] * rows for g in dims}

    def _grow(self, group: str, rank: int) -> None:
        for buffers in (self.A, self.Bt):
            old = buffers[group]
            new = torch.zeros(*old.shape[:2], rank, old.shape[3], **self.to)
            new[:, :, :old.shape[2]] = old
            buffers[group] = new

    def assign(self, slot: int, weights: AdapterWeights | None) -> None:
        """Copy the factors of `weights` (None: the base, no factors) into row `slot`."""
        for group in self.dims:
            factors = weights.groups.get(group) if weights is not None else None
            rank = factors.rank if factors is not None else 0
            if rank > self.A[group].shape[2]:
                self._grow(group, rank)
            self.rank[group][slot] = rank
            if factors is not None:
                self.A[group][:, slot, :rank] = factors.A
                self.Bt[group][:, slot, :rank] = factors.Bt
            self.A[group][:, slot, rank:] = 0
            self.Bt[group][:, slot, rank:] = 0
            if factors is not None and factors.g is not None and group not in self.g:
                n, _, d_out = self.dims[group]
                self.g[group] = torch.ones(n, self.rows, d_out, **self.to)
            if group in self.g:
                self.g[group][:, slot] = factors.g if factors is not None and factors.g is not None else 1

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst`."""
        for group in self.dims:
            self.A[group][:, dst] = self.A[group][:, src]
            self.Bt[group][:, dst] = self.Bt[group][:, src]
            self.rank[group][dst] = self.rank[group][src]
            if group in self.g:
                self.g[group][:, dst] = self.g[group][:, src]


class GatherPlan:
    """The gather strategy for decoding rows 0..n-1, all on adapters (see the module docstring)."""

    def __init__(self, factors: RowFactors, adapters: list[AdapterWeights]) -> None:
        n = len(adapters)
        self.n = n
        self.A, self.Bt, self.g = {}, {}, {}
        for group in factors.dims:
            rank = max(factors.rank[group][:n])
            if rank == 0:
                continue  # no row's adapter touches this group
            self.A[group] = factors.A[group][:, :n, :rank].transpose(2, 3)  # (layers, n, d_in, R)
            self.Bt[group] = factors.Bt[group][:, :n, :rank]  # (layers, n, R, d_out)
            if group in factors.g and any(_dora(a.groups.get(group)) for a in adapters):
                self.g[group] = factors.g[group][:, :n]

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, d_out) += each row's update of x (n, d_in); DoRA rows scaled by their g."""
        A = self.A.get(group)
        if A is None:
            return
        h = torch.bmm(x.to(A.dtype).unsqueeze(1), A[layer])  # (n, 1, R)
        out.add_(torch.bmm(h, self.Bt[group][layer]).squeeze(1))
        if group in self.g:
            out.mul_(self.g[group][layer])


def _dora(factors: GroupFactors | None) -> bool:
    return factors is not None and factors.g is not None


def segment_update(factors: GroupFactors, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
    """out (t, d_out) += x A^T Bt for one adapter's rows (then DoRA's scale), in place."""
    if not factors.present[layer]:
        return
    A = factors.A[layer]
    out.add_(torch.mm(torch.mm(x.to(A.dtype), A.T), factors.Bt[layer]))
    if factors.g is not None:
        out.mul_(factors.g[layer])


class SegmentPlan:
    """The segment strategy for decoding rows 0..n-1, all on adapters (see the module docstring)."""

    def __init__(self, adapters: list[AdapterWeights], device: torch.device) -> None:
        first_seen: dict[int, int] = {}
        order = sorted(range(len(adapters)), key=lambda i: first_seen.setdefault(id(adapters[i]), i))
        self.perm = None if order == sorted(order) else torch.tensor(order, device=device)
        self.inverse = None if self.perm is None else torch.argsort(self.perm)
        self.n = len(adapters)
        # per group: [(start, end, factors)] over the rows in `order`
        self.segments: dict[str, list[tuple[int, int, GroupFactors]]] = {}
        start = 0
        while start < len(order):
            weights = adapters[order[start]]
            end = start + 1
            while end < len(order) and adapters[order[end]] is weights:
                end += 1
            for group, factors in weights.groups.items():
                self.segments.setdefault(group, []).append((start, end, factors))
            start = end

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, d_out) += each row's update of x (n, d_in); DoRA rows scaled by their g."""
        segments = self.segments.get(group)
        if not segments:
            return
        if self.perm is None and len(segments) == 1 and segments[0][:2] == (0, self.n):
            segment_update(segments[0][2], layer, x, out)  # one adapter for every row: no regrouping
            return
        xs = x if self.perm is None else x.index_select(0, self.perm)
        ys = out if self.perm is None else out.index_select(0, self.perm)
        for start, end, factors in segments:
            segment_update(factors, layer, xs[start:end], ys[start:end])
        if self.perm is not None:
            out.copy_(ys.index_select(0, self.inverse))


class LoraBatch:
    """The LoRA branch of one forward: decoding rows first (`decode`, over the first tokens), then each new
    prompt's tokens as one segment.

    Args:
        decode: a GatherPlan or SegmentPlan for the decoding rows on adapters (None: none).
        prefill: [(start, end, adapter)] token ranges of new prompts served by an adapter.
    """

    def __init__(self, decode: GatherPlan | SegmentPlan | None, prefill: list[tuple[int, int, AdapterWeights]]) -> None:
        self.decode = decode
        self.prefill = [(s, e, w) for s, e, w in prefill]

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the update of every row of x (tokens, d_in) into out (tokens, d_out), in place."""
        if self.decode is not None:
            n = self.decode.n
            self.decode.apply(layer, group, x[:n], out[:n])
        for start, end, weights in self.prefill:
            factors = weights.groups.get(group)
            if factors is not None:
                segment_update(factors, layer, x[start:end], out[start:end])
