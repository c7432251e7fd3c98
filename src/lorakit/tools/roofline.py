"""What the hardware allows: the GEMM limit of a training step and the memory-bandwidth limit of decoding.

GEMM limit: one step runs under a `TorchDispatchMode` that records every matrix product it dispatches
(aten mm / addmm / bmm / baddbmm with their shapes, strides and dtypes, forward and backward alike); the
recorded products are then replayed back to back on fresh tensors, nothing else in between. No
implementation of that step on this hardware can be faster than the replay: it is the step's roofline.

Bandwidth limit: decoding one token reads every weight once, so tokens/s <= bandwidth / weight bytes,
with the bandwidth measured here by streaming a buffer far larger than the caches.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The matrix products a step's GEMM time is made of; everything else (norms, softmax, casts) is not.
# Products written into a given buffer (`out=`) count too; they are replayed as the plain op.
GEMM_OPS = {
    torch.ops.aten.mm.default: "mm",
    torch.ops.aten.addmm.default: "addmm",
    torch.ops.aten.bmm.default: "bmm",
    torch.ops.aten.baddbmm.default: "baddbmm",
}
_OUT_VARIANTS = {torch.ops.aten.mm.out: "mm", torch.ops.aten.addmm.out: "addmm", torch.ops.aten.bmm.out: "bmm",
                 torch.ops.aten.baddbmm.out: "baddbmm"}


@dataclass(frozen=True)
class Gemm:
    """One recorded matrix product: its op and (shape, stride, dtype) of every tensor argument."""

    op: str
    args: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], ...]

    @property
    def flops(self) -> int:
        """2 x M x N x K (x batch): the multiply-adds of the product."""
        a, b = (self.args[1], self.args[2]) if self.op in ("addmm", "baddbmm") else (self.args[0], self.args[1])
        *batch, m, k = a[0]
        n = b[0][-1]
        return 2 * m * n * k * (batch[0] if batch else 1)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Gemm] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = GEMM_OPS.get(func) or _OUT_VARIANTS.get(func)
        if name:  # the operands only: an out= buffer is a keyword argument
            tensors = tuple((tuple(a.shape), tuple(a.stride()), a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.calls.append(Gemm(name, tensors))
        return func(*args, **(kwargs or {}))


def capture_gemms(step: Callable[[], None]) -> list[Gemm]:
    """Run `step` once and return the matrix products it dispatched, in order."""
    recorder = _Recorder()
    with recorder:
        step()
    return recorder.calls


def random_operands(call: Gemm, device: torch.device) -> list[torch.Tensor]:
    """Fresh tensors of the recorded shapes, strides and dtypes (normal values; integers zero) to replay `call` on."""
    out = []
    for shape, stride, dtype in call.args:
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        t.normal_() if dtype.is_floating_point else t.zero_()
        out.append(t)
    return out


def replay_seconds(calls: list[Gemm], device: torch.device, repeats: int = 5) -> float:
    """Median time of running `calls` back to back (operands allocated once per distinct product)."""
    funcs = {name: op for op, name in GEMM_OPS.items()}
    operands = {call: random_operands(call, device) for call in set(calls)}
    plan = [(funcs[call.op], operands[call]) for call in calls]

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for func, args in plan:
            func(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()  # warm-up: first calls pick kernels and fault in pages
    return statistics.median(once() for _ in range(repeats))


def gemm_summary(calls: list[Gemm]) -> dict:
    """Counts and FLOPs of the recorded products, and the most frequent shapes."""
    by_shape = Counter((c.op, tuple(a[0] for a in c.args), str(c.args[-1][2]).replace("torch.", "")) for c in calls)
    return {"gemms": len(calls), "gflop": sum(c.flops for c in calls) / 1e9,
            "top_shapes": [{"op": op, "shapes": shapes, "dtype": dtype, "count": n}
                           for (op, shapes, dtype), n in by_shape.most_common(8)]}


def memory_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second read from memory: the best of summing a buffer much larger than the caches."""
    n = megabytes * 2**20 // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        buf.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return buf.numel() * buf.element_size() / best


def decode_limit_tokens_per_s(weight_bytes: int, bandwidth: float) -> float:
    """The batch-1 decoding ceiling: every weight is read once per token."""
    return bandwidth / weight_bytes
