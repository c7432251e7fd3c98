"""Where a training step's time goes: torch.profiler's self time of every operator, summed by category.

The categories are what a roofline reading needs: matrix products (the limit row replays these),
attention kernels, normalization, elementwise work between products (activations, residual adds,
rotary, masks), dtype casts and copies, the loss, the optimizer, and the rest (autograd bookkeeping,
views, allocation).
"""
from __future__ import annotations

from typing import Callable

# First match wins: more specific patterns come first.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimizer", ("_foreach", "adam")),  # fused or foreach AdamW (addcmul is also rotary's: elementwise)
    ("loss", ("cross_entropy", "nll_loss", "log_softmax", "logsumexp")),
    ("attention", ("attention", "softmax", "_flash", "sdpa", "baddbmm")),
    ("matmul", ("mm", "bmm", "matmul", "linear", "gemm")),
    ("norm", ("rms_norm", "layer_norm", "rsqrt", "pow", "mean", "var")),
    ("cast/copy", ("copy_", "to_copy", "_to_copy", "clone", "contiguous", "cat", "index", "embedding", "fill_",
                   "zero_")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "sigmoid", "neg", "where", "masked", "exp", "tanh",
                     "gelu", "cos", "sin", "sum")),
)


def category(op_name: str) -> str:
    """The category of an operator name such as 'aten::addmm' or 'aten::silu_backward'."""
    name = op_name.lower().removeprefix("aten::")
    for label, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return label
    return "other"


def profile_step(step: Callable[[], None], steps: int = 3) -> dict[str, float]:
    """Seconds per step by category (self CPU time of every operator), over `steps` runs of `step`.

    On a GPU the categories hold the host-side time; the GPU's own kernel time is in `device_total`.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        label = category(event.key)
        totals[label] = totals.get(label, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def breakdown_table(profiles: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per configuration, one column per category (seconds per step, share)."""
    labels = [label for label, _ in CATEGORIES] + ["other"]
    lines = ["| config | " + " | ".join(labels) + " | total (s) |", "|---" * (len(labels) + 2) + "|"]
    for name, prof in profiles.items():
        total = sum(prof.values()) or 1.0
        cells = [f"{prof.get(label, 0.0):.3f} ({100 * prof.get(label, 0.0) / total:.0f}%)" for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total:.3f} |")
    return "\n".join(lines)
