"""The LoRA branch of a batch whose rows use different adapters.

The base GEMM of a projection group runs once for every token of the batch; this module adds each row's
update `x A^T Bt` (and DoRA's per-row scale) in place. Three ways for the decoding rows, chosen by
`EngineConfig.lora_strategy`:

* **gather** (vLLM's bmm path): each batch row has its own copy of its adapter's factors in
  preallocated per-row buffers (copied in when the request joins, not per step), zero-padded to the largest
  rank in the batch, and the whole batch runs as batched matmuls: one for A per group, one for B per
  projection: a fixed number of kernel calls whatever the mix of adapters, but rows on the same adapter
  read its factors once each.
* **segment** (S-LoRA/Punica's SGMV as a loop): rows are grouped by adapter and each group runs two plain
  GEMMs on its own factors: each adapter's factors are read once, at two calls per adapter in the batch.

* **fused** (the default where it builds: `FusedPlan`): each group is one call of lorakit's compiled kernel
  (lorakit.serve.lora_kernel), in which each row reads its own adapter's factors where they lie, rows on the
  same adapter one after another: no per-row copies, one call per group whatever the mix of adapters.

When every decoding row is on the same adapter (batch-1 decoding above all), gather and segment run
`OneAdapterPlan`: two plain GEMMs per group, no per-row copies, no regrouping.

Rows on the base model sit after the adapter rows (the engine keeps that order) and skip the branch.
Newly admitted prompts (prefill) are one contiguous segment each: with the compiled kernels (fused) every prompt of
a forward is one call of `lora_segments_` per layer and group, 16 tokens at a time (S-LoRA's SGMV on the CPU);
else two GEMMs per prompt (`segment_update`).
"""
from __future__ import annotations

import torch

from lorakit.serve.adapters import AdapterWeights, GroupFactors
from lorakit.serve.lora_kernel import Kernel, SegmentKernel, kernel_table


class RowFactors:
    """Per-row copies of the running rows' factors (the gather strategy's operands).

    For each group: A (layers, rows, sum(caps), d_in), projection i owning a block of caps[i] rows, and per
    projection Bt_i (layers, rows, caps[i], d_out_i): B without the block-diagonal zeros, which would
    otherwise be read once per row. caps[i] is the largest rank of projection i among the rows (`fit`);
    a row of lower rank is zero beyond its own.

    Args:
        layouts: {group: (layers, d_in, out_sizes)}.
        rows: slots (the KV cache's, its spare included).
        dtype, device: the factors'.
    """

    def __init__(self, layouts: dict[str, tuple[int, int, tuple[int, ...]]], rows: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layouts, self.rows, self.to = layouts, rows, {"dtype": dtype, "device": device}
        self.caps = {g: (0,) * len(sizes) for g, (_, _, sizes) in layouts.items()}
        self.rank = {g: [(0,) * len(sizes)] * rows for g, (_, _, sizes) in layouts.items()}
        self.A: dict[str, torch.Tensor] = {}
        self.Bt: dict[str, list[torch.Tensor]] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.version = 0  # bumped whenever the buffers are reallocated (plans hold views of them)
        for group in layouts:
            self._relayout(group, self.caps[group])

    def _relayout(self, group: str, caps: tuple[int, ...]) -> None:
        n, d_in, sizes = self.layouts[group]
        old_A, old_Bt, old_caps = self.A.get(group), self.Bt.get(group), self.caps[group]
        self.A[group] = torch.zeros(n, self.rows, sum(caps), d_in, **self.to)
        self.Bt[group] = [torch.zeros(n, self.rows, c, d, **self.to) for c, d in zip(caps, sizes)]
        if old_A is not None:  # keep what the rows hold: each projection's block, up to the smaller cap
            for i, (old, new) in enumerate(zip(old_caps, caps)):
                keep = min(old, new)
                src, dst = sum(old_caps[:i]), sum(caps[:i])
                self.A[group][:, :, dst:dst + keep] = old_A[:, :, src:src + keep]
                self.Bt[group][i][:, :, :keep] = old_Bt[i][:, :, :keep]
        self.caps[group] = caps
        self.version += 1

    def fit(self, slots: list[int]) -> None:
        """Size every block to the largest rank among the rows in `slots` (the occupied ones)."""
        for group, caps in self.caps.items():
            needed = tuple(max((self.rank[group][s][i] for s in slots), default=0) for i in range(len(caps)))
            if needed != caps:
                self._relayout(group, needed)

    def assign(self, slot: int, weights: AdapterWeights | None) -> None:
        """Copy the factors of `weights` (None: the base, no factors) into row `slot`."""
        for group, (_, _, sizes) in self.layouts.items():
            factors = weights.groups.get(group) if weights is not None else None
            ranks = factors.ranks if factors is not None else (0,) * len(sizes)
            if any(r > c for r, c in zip(ranks, self.caps[group])):
                self._relayout(group, tuple(map(max, ranks, self.caps[group])))
            self.rank[group][slot] = ranks
            self.A[group][:, slot] = 0
            src, dst, col = 0, 0, 0
            for i, (rank, cap, size) in enumerate(zip(ranks, self.caps[group], sizes)):
                self.Bt[group][i][:, slot] = 0
                if rank:
                    self.A[group][:, slot, dst:dst + rank] = factors.A[:, src:src + rank]
                    self.Bt[group][i][:, slot, :rank] = factors.Bt[:, src:src + rank, col:col + size]
                src, dst, col = src + rank, dst + cap, col + size
            if factors is not None and factors.g is not None and group not in self.g:
                n, _, sizes = self.layouts[group]
                self.g[group] = torch.ones(n, self.rows, sum(sizes), **self.to)
                self.version += 1
            if group in self.g:
                self.g[group][:, slot] = factors.g if factors is not None and factors.g is not None else 1

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst`."""
        for group in self.layouts:
            self.A[group][:, dst] = self.A[group][:, src]
            for Bt in self.Bt[group]:
                Bt[:, dst] = Bt[:, src]
            self.rank[group][dst] = self.rank[group][src]
            if group in self.g:
                self.g[group][:, dst] = self.g[group][:, src]


class GatherPlan:
    """The gather strategy for decoding rows 0..n-1, all on adapters (see the module docstring)."""

    def __init__(self, factors: RowFactors, adapters: list[AdapterWeights]) -> None:
        n = len(adapters)
        self.n = n
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, list[tuple[int, int, int, int, torch.Tensor]]] = {}  # (row, rank, col, width, Bt)
        self.g: dict[str, torch.Tensor] = {}
        for group, caps in factors.caps.items():
            used = [max(factors.rank[group][s][i] for s in range(n)) for i in range(len(caps))]
            if not any(used):
                continue  # no row's adapter touches this group
            self.A[group] = factors.A[group][:, :n].transpose(2, 3)  # (layers, n, d_in, sum(caps))
            sizes = factors.layouts[group][2]
            offsets, cols = [sum(caps[:i]) for i in range(len(caps))], [sum(sizes[:i]) for i in range(len(sizes))]
            self.B[group] = [(off, r, col, size, Bt[:, :n, :r]) for off, r, col, size, Bt
                             in zip(offsets, used, cols, sizes, factors.Bt[group]) if r]
            if group in factors.g and any(_dora(a.groups.get(group)) for a in adapters):
                self.g[group] = factors.g[group][:, :n]

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, d_out) += each row's update of x (n, d_in); DoRA rows scaled by their g."""
        A = self.A.get(group)
        if A is None:
            return
        h = torch.bmm(x.to(A.dtype).unsqueeze(1), A[layer])  # (n, 1, sum(caps))
        for row, rank, col, width, Bt in self.B[group]:
            out[:, col:col + width].add_(torch.bmm(h[:, :, row:row + rank], Bt[layer]).squeeze(1))
        if group in self.g:
            out.mul_(self.g[group][layer])


def _grouped_by_adapter(adapters: list[AdapterWeights]) -> list[int]:
    """Row indices with rows on the same adapter side by side, adapters in order of first appearance."""
    first_seen: dict[int, int] = {}
    return sorted(range(len(adapters)), key=lambda i: first_seen.setdefault(id(adapters[i]), i))


def _dora(factors: GroupFactors | None) -> bool:
    return factors is not None and factors.g is not None


def segment_update(factors: GroupFactors, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
    """out (t, d_out) += x A^T Bt for one adapter's rows (then DoRA's scale), in place."""
    if not factors.present[layer]:
        return
    add_update(x, factors.A[layer].T, factors.Bt[layer], None if factors.g is None else factors.g[layer], out)


def add_update(x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, g: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (t, d_out) += (x At) Bt, then *= g (DoRA) where given; x (t, d_in), At (d_in, R), Bt (R, d_out)."""
    h = torch.mm(x if x.dtype == At.dtype else x.to(At.dtype), At)  # (t, R)
    if out.dtype == h.dtype:
        out.addmm_(h, Bt)  # the product and the add in one call
    else:
        out.add_(torch.mm(h, Bt))
    if g is not None:
        out.mul_(g)


class OneAdapterPlan:
    """Decoding rows 0..n-1 all on one adapter: per layer and group two GEMMs, on A^T laid out once per plan.

    The leanest path for batch-1 decoding with an unmerged adapter: no regrouping, no per-row copies, and
    per call only a list lookup before the kernels.
    """

    def __init__(self, weights: AdapterWeights, n: int) -> None:
        self.n = n
        # group -> per layer (A^T (d_in, R) contiguous, Bt (R, d_out), DoRA's g (d_out,) or None); None where
        # the adapter leaves the layer's group alone
        self.layers: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]] = {
            group: [(f.A[i].T.contiguous(), f.Bt[i], None if f.g is None else f.g[i]) if f.present[i] else None
                    for i in range(len(f.present))]
            for group, f in weights.groups.items()}

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, d_out) += the adapter's update of x (n, d_in); scaled by g under DoRA."""
        factors = self.layers.get(group)
        if factors is None or factors[layer] is None:
            return
        add_update(x, *factors[layer], out)


class SegmentPlan:
    """The segment strategy for decoding rows 0..n-1, all on adapters (see the module docstring)."""

    def __init__(self, adapters: list[AdapterWeights], device: torch.device) -> None:
        order = _grouped_by_adapter(adapters)
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


class FusedPlan:
    """The fused strategy for decoding rows 0..n-1, all on adapters: a group is one call of the compiled kernel.

    Args:
        adapters: each row's adapter (the plan keeps them: the kernel's tables hold their factors' addresses).
        kernel: lorakit.serve.lora_kernel's compiled `lora_rows_`.
    """

    def __init__(self, adapters: list[AdapterWeights], kernel: Kernel) -> None:
        self.n, self.adapters, self.kernel = len(adapters), adapters, kernel
        order = _grouped_by_adapter(adapters)
        # group -> (per layer: the kernel's table of the rows on adapters that touch the group, widths, bf16 factors)
        self.calls: dict[str, tuple[list[torch.Tensor], list[int], bool]] = {}
        self.tables: dict[str, torch.Tensor] = {}  # group -> (layers, rows, fields), what the calls hold views of
        for group in dict.fromkeys(g for a in adapters for g in a.groups):
            rows = [i for i in order if group in adapters[i].groups]
            factors = [adapters[i].groups[group] for i in rows]
            table = torch.stack([kernel_table(f) for f in factors], dim=1)  # (layers, rows, fields), a copy
            table[:, :, 0] = torch.tensor(rows)
            self.tables[group] = table
            self.calls[group] = (list(table.unbind(0)), list(factors[0].widths), factors[0].A.dtype == torch.bfloat16)
        self._step_operands: tuple | None = None

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, d_out) += each row's update of x (n, d_in); DoRA rows scaled by their g."""
        call = self.calls.get(group)
        if call is not None:
            tables, widths, bf16 = call
            self.kernel(x, out, tables[layer], widths, bf16)


    def step_operands(self, groups: tuple[str, ...]) -> tuple[list[torch.Tensor], list[list[int]], bool]:
        """The LoRA operands of the compiled decoding step (lorakit.serve.decode_step): per group in `groups`
        order the (layers, rows, fields) table and the blocks' widths (empty where no row touches the group),
        and whether the factors are bf16. Made once per plan."""
        if self._step_operands is None:
            empty = torch.empty(0, dtype=torch.long)
            tables = [self.tables.get(g, empty) for g in groups]
            widths = [self.calls[g][1] if g in self.calls else [] for g in groups]
            self._step_operands = (tables, widths, any(call[2] for call in self.calls.values()))
        return self._step_operands


DecodePlan = GatherPlan | SegmentPlan | OneAdapterPlan | FusedPlan


class LoraBatch:
    """The LoRA branch of one forward: decoding rows first (`decode`, over the first tokens), then each new
    prompt's tokens as one segment.

    Args:
        decode: a DecodePlan for the decoding rows on adapters (None: none).
        prefill: [(start, end, adapter)] token ranges of new prompts served by an adapter.
        kernel: the compiled `lora_segments_` (lorakit.serve.lora_kernel) for the prompts: one call per layer and
            group for all of them; None: two GEMMs per prompt, layer and group (`segment_update`).
    """

    def __init__(self, decode: DecodePlan | None, prefill: list[tuple[int, int, AdapterWeights]],
                 kernel: SegmentKernel | None = None) -> None:
        self.decode = decode
        self.prefill = [(s, e, w) for s, e, w in prefill]
        self.kernel = kernel if self.prefill else None
        self._prefill_calls: dict[str, tuple | None] = {}  # group -> the kernel's operands, made on first use
        if decode is not None and not self.prefill:
            self.apply = self._decode_only  # per call: no prefill loop, no slicing when every row decodes

    def _decode_only(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        n = self.decode.n
        if x.shape[0] == n:
            self.decode.apply(layer, group, x, out)
        else:
            self.decode.apply(layer, group, x[:n], out[:n])

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the update of every row of x (tokens, d_in) into out (tokens, d_out), in place."""
        if self.decode is not None:
            n = self.decode.n
            self.decode.apply(layer, group, x[:n], out[:n])
        if self.kernel is not None:
            if group not in self._prefill_calls:
                self._prefill_calls[group] = self._segment_operands(group)
            call = self._prefill_calls[group]
            if call is not None:
                tables, lengths, widths, bf16 = call
                self.kernel(x, out, tables[layer], lengths, widths, bf16)
            return
        for start, end, weights in self.prefill:
            factors = weights.groups.get(group)
            if factors is not None:
                segment_update(factors, layer, x[start:end], out[start:end])

    def _segment_operands(self, group: str) -> tuple[list[torch.Tensor], torch.Tensor, list[int], bool] | None:
        """The segment kernel's operands for `group`: per layer a (prompts, fields) table of the prompts whose
        adapter touches it (their first token where the row is), their lengths, the widths, bf16 factors."""
        touching = [(start, end, w.groups[group]) for start, end, w in self.prefill if group in w.groups]
        if not touching:
            return None
        table = torch.stack([kernel_table(f) for _, _, f in touching], dim=1)  # (layers, prompts, fields), a copy
        table[:, :, 0] = torch.tensor([start for start, _, _ in touching])
        lengths = torch.tensor([end - start for start, end, _ in touching], dtype=torch.long)
        factors = touching[0][2]
        return list(table.unbind(0)), lengths, list(factors.widths), factors.A.dtype == torch.bfloat16
