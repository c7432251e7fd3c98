"""`lorakit plan --shard fsdp --nproc N`: per-device training memory when FSDP2 shards the model over N
processes (`lorakit train --shard fsdp`), and whether it fits a device of a given size.

Per device, in bytes (e: bytes per element of the compute dtype):

    weights           (base + fp32 LoRA factors) / N    every parameter is sharded along dim 0
    gradients         4 x trainable / N                 reduce-scattered: each keeps its shard's
    optimizer states  8 x trainable / N                 AdamW's two fp32 moments, sharded likewise
    gathered          root + 2 x block                  the root unit (embeddings, norm, head) stays gathered
                                                        through forward and backward; one block runs while
                                                        the next one's all-gather is in flight
    activations       as unsharded (`plan.activation_bytes`): each process runs its own micro-batch
    logits            tokens x vocab x (e + 8)          the model's own head and loss (the fused chunked
                                                        loss needs the head outside FSDP's hooks)
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Units:
    """Full sizes, in bytes, of what FSDP gathers: one decoder block and the root unit."""

    block: int
    root: int


def shard_parts(parts: dict[str, int], trainable: int, units: Units, nproc: int, logits: int) -> dict[str, int]:
    """Per-device memory of a LoRA/QLoRA run sharded over `nproc` processes, from the unsharded `parts`
    (`plan.memory_parts`; its weights include the fp32 factors).

    Returns:
        weights, gradients, optimizer_states, gathered, activations, activations_checkpointed, logits,
        total and total_checkpointed, in bytes.
    """
    out = {"weights": -(-parts["weights"] // nproc), "gradients": -(-4 * trainable // nproc),
           "optimizer_states": -(-8 * trainable // nproc), "gathered": units.root + 2 * units.block,
           "activations": parts["activations"], "activations_checkpointed": parts["activations_checkpointed"],
           "logits": logits}
    fixed = out["weights"] + out["gradients"] + out["optimizer_states"] + out["gathered"] + logits
    out["total"] = fixed + out["activations"]
    out["total_checkpointed"] = fixed + out["activations_checkpointed"]
    return out


def devices_needed(per_nproc, device_bytes: float, largest: int = 1024) -> int | None:
    """The smallest power-of-two N whose per-device total (with checkpointing) fits `device_bytes`; None
    if even `largest` does not (the gathered units and activations do not shrink with N).

    Args:
        per_nproc: N -> `shard_parts` of that N.
    """
    n = 1
    while n <= largest:
        if per_nproc(n)["total_checkpointed"] <= device_bytes:
            return n
        n *= 2
    return None


def shard_table(results: dict[str, dict], nproc: int, device_gb: float, human) -> str:
    """Markdown: per-device parts of each method at `nproc`, and (with a device size) fits / N needed."""
    methods = list(results)
    rows = [("weights (shard)", "weights"), ("gradients (shard)", "gradients"),
            ("optimizer states (shard)", "optimizer_states"), ("gathered: root + 2 blocks", "gathered"),
            ("activations", "activations"), ("activations, checkpointing", "activations_checkpointed"),
            ("logits", "logits"), ("**total**", "total"), ("**total, checkpointing**", "total_checkpointed")]
    lines = [f"per device with --shard fsdp over {nproc} processes:", "",
             "| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(human(results[m]["parts"][key]) for m in methods) + " |")
    if device_gb:
        fits = ["yes" if results[m]["fits"] else "no" for m in methods]
        need = [str(results[m]["devices_needed"] or "> 1024") for m in methods]
        lines.append(f"| fits {device_gb:g} GB (checkpointing) | " + " | ".join(fits) + " |")
        lines.append(f"| devices of {device_gb:g} GB needed | " + " | ".join(need) + " |")
    return "\n".join(lines)
