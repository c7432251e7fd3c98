"""A whole decoding step in one compiled call (csrc/decode_step.cpp): the engine's fast path for steps that
only decode (no new prompts), at up to 16 rows, in bf16 on CPUs with AVX-512 BF16.

Why: after the batch-1 products reached about 0.8x the memory bandwidth (the gemv layout), a third of a step
was the ~25 small torch ops per layer around them (norms, rotary, cache writes, attention's bookkeeping, adds,
casts): 10-20 us of dispatch each, for a few hundred values of work. The compiled step runs them as plain
loops between its own products, and the rows' LoRA updates (the fused strategy's tables) in the same pass.
It rounds where the torch path rounds (lorakit.serve.llama), so the two agree to bf16's precision (tested).

`EngineConfig.decode_step` chooses: "auto" (compiled where it applies), "compiled" (an error where it cannot
run, saying why) or "torch".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.serve.lora_kernel import step_kernel
from lorakit.serve.multi_lora import FusedPlan
from lorakit.serve.step_batch import StepBatch
from lorakit.serve.weights import ROW_LAYOUTS, copy_of, rows_of

# the runner's type is lorakit.serve.llama.LlamaRunner, which builds its CompiledStep: `Any` keeps the import one-way
Runner = Any

MAX_ROWS = 16  # the compiled products' register blocking (bf16_gemv, bf16_tiles)
STEP_CHOICES = ("auto", "compiled", "torch")


def why_not_compiled(model: nn.Module, dtype: torch.dtype, device: torch.device, layout: str | None) -> str:
    """Why the compiled step cannot run `model` in `dtype` on `device` with weights in `layout` ("" when it can;
    layout None: any layout that holds the weights' rows)."""
    config = model.config
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    if device.type != "cpu" or dtype != torch.bfloat16:
        return f"it runs bf16 models on the CPU, not {dtype} on {device.type}"
    if layout is not None and layout not in ROW_LAYOUTS:
        return f"it reads the weights' rows: weight_layout {layout!r} holds none (use {', '.join(ROW_LAYOUTS)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"it computes SiLU gates, not {getattr(config, 'hidden_act', None)!r}"
    if any(type(m).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") for m in norms) or \
            len({m.variance_epsilon for m in norms}) != 1:
        return "it computes Llama's RMSNorm with one epsilon"
    if step_kernel() is None:
        return "its compiled kernel did not build or this CPU has no AVX-512 BF16 (see lorakit.serve.lora_kernel)"
    return ""


class CompiledStep:
    """The operands of csrc/decode_step.cpp for one runner, gathered once; `run` does a decode-only step.

    Args:
        runner: the engine's runner (its fused weights, norms, rotary tables and cache).
        model: the base model whose modules the runner holds.
    """

    def __init__(self, runner: Runner, model: nn.Module) -> None:
        self.kernel, self.runner = step_kernel(), runner
        layout = runner.weight_layout
        no_bias = torch.empty(0, dtype=runner.dtype)
        self.weights = [rows_of(layer.weights[g], layout) for layer in runner.layers for g in layer.weights]
        self.biases = [b if b is not None else no_bias for layer in runner.layers for b in layer.biases.values()]
        norms = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight) for layer in model.model.layers]
        self.norms = [w.detach() for pair in norms for w in pair] + [model.model.norm.weight.detach()]
        self.eps = model.model.norm.variance_epsilon
        self.head = rows_of(runner.head_weight, layout)
        # the copies beside the rows: gemv's packed ones run steps of more than one row (oneDNN), tiles' every step
        self.packed = [copy_of(held, layout) for held in [*(w for layer in runner.layers for w in layer.weights.values()),
                                                          runner.head_weight]] if layout in ("gemv", "tiles") else []
        self.cos, self.signed_sin = runner.cos.contiguous(), runner.signed_sin.contiguous()
        self.groups = tuple(runner.layers[0].weights)  # qkv, o, gate_up, down: the kernel's order
        self.no_lora = ([torch.empty(0, dtype=torch.long)] * len(self.groups), [[]] * len(self.groups), False)

    def takes(self, batch: StepBatch) -> bool:
        """Whether `run` can do this step: decoding rows only, at most MAX_ROWS, LoRA (if any) fused."""
        lora = batch.lora
        return not batch.prefills and batch.n_decode <= MAX_ROWS and (
            lora is None or isinstance(lora.decode, FusedPlan) and not lora.prefill)

    def run(self, batch: StepBatch) -> torch.Tensor:
        """The step's logits (len(logit_rows), vocab), the cache updated, as LlamaRunner.forward."""
        runner = self.runner
        tables, widths, bf16 = batch.lora.decode.step_operands(self.groups) if batch.lora is not None else self.no_lora
        h = runner.embed(batch.tokens)
        logits = self.kernel(h, self.weights, self.packed, self.biases, self.norms, self.head, runner.cache.k,
                             runner.cache.v, batch.positions, self.cos, self.signed_sin, runner.n_heads, self.eps,
                             runner.scaling, tables, widths, bf16)
        if batch.logit_rows.shape[0] != batch.n_decode:
            logits = logits[batch.logit_rows]
        return logits if runner.head_bias is None else logits.add_(runner.head_bias)


def compiled_step(runner: Runner, model: nn.Module, choice: str) -> CompiledStep | None:
    """The runner's compiled step for `EngineConfig.decode_step` (None: the torch path).

    Raises:
        LorakitError: `choice` is unknown, or "compiled" where it cannot run (the message says why).
    """
    if choice not in STEP_CHOICES:
        raise LorakitError(f"decode_step={choice!r} is invalid: use one of {', '.join(STEP_CHOICES)}.")
    if choice == "torch":
        return None
    reason = why_not_compiled(model, runner.dtype, runner.device, runner.weight_layout)
    if reason and choice == "compiled":
        raise LorakitError(f"decode_step='compiled' cannot run here: {reason}. Use decode_step='auto' or 'torch'.")
    return None if reason else CompiledStep(runner, model)
