"""TrainConfig: every option of `lorakit train`, one dataclass whose fields are the command's flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorakit.core.errors import LorakitError
from lorakit.methods.registry import make_methods

# Default --method-lr-ratio: IA3 vectors and virtual tokens move the model through far fewer numbers than
# LoRA's factors and train at larger rates; at the default --lr these give PEFT's usual 1e-2 (IA3, prefix
# tuning) and 3e-2 (prompt tuning).
METHOD_LR_RATIO = {"ia3": 20.0, "prefix": 20.0, "prompt": 60.0}


@dataclass
class TrainConfig:
    model: str | None = None
    """Base model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face model directory."""
    data: str | None = None
    """Training data (.jsonl, .csv, .txt). Omitted: the built-in order-record task."""
    format: Literal["auto", "text", "instruction", "chat"] = "auto"
    """Data format; 'auto' detects it from the first record."""
    eval_data: str | None = None
    """Held-out data; omitted: a split of --data (see --eval-fraction)."""
    output: str = "runs/lorakit"
    """Run directory: adapter/, checkpoints/, config.yaml, metrics.jsonl, loss.png, report.md."""
    method: str = "lora"
    """Parameter-efficient method: lora, dora, pissa, ia3, adapter, prefix, prompt (lorakit.methods); several joined by '+', e.g. lora+prefix."""
    method_lr_ratio: dict[str, float] = field(default_factory=lambda: dict(METHOD_LR_RATIO))
    """Learning-rate multiplier for each method's parameters (JSON): prefix/prompt/IA3 vectors need larger steps than LoRA factors."""
    num_virtual_tokens: int = 20
    """Prefix and prompt tuning: virtual tokens."""
    bottleneck_size: int = 32
    """Bottleneck adapters (--method adapter): inner width of each adapter."""
    adapter_placement: Literal["both", "attention", "mlp"] = "both"
    """Bottleneck adapters: after each block's attention, its MLP, or both."""
    ia3_target_modules: list[str] = field(default_factory=list)
    """IA3: modules whose activations it rescales; empty: PEFT's defaults for the model (Llama: k_proj,v_proj,down_proj)."""
    ia3_feedforward_modules: list[str] = field(default_factory=list)
    """IA3: the targets whose input (not output) it rescales; empty: the defaults (Llama: down_proj)."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scaling = lora_alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: comma-separated names (q_proj,v_proj) or all-linear."""
    use_rslora: bool = False
    """Rank-stabilized scaling lora_alpha / sqrt(r)."""
    init_lora_weights: Literal["default", "gaussian", "pissa"] = "default"
    """Initialization of A and B."""
    max_steps: int = 0
    """Optimizer steps; 0: run --epochs."""
    epochs: float = 1.0
    """Passes over the training data (when --max-steps is 0)."""
    batch_size: int = 8
    """Samples per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    loraplus_lr_ratio: float = 1.0
    """LoRA+: the learning rate of B is this times that of A (1: plain LoRA; the paper suggests 16)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    max_seq_len: int = 512
    """Longest sample in tokens."""
    truncate: bool = False
    """Cut over-long instruction/chat samples instead of stopping with an error."""
    packing: bool = False
    """Pack short samples into --max-seq-len blocks."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (default: the loss covers responses only)."""
    eval_fraction: float = 0.1
    """Held-out fraction of --data when --eval-data is not given."""
    eval_every: int = 0
    """Held-out loss every N steps (0: only before and after)."""
    eval_samples: int = 100
    """Held-out samples for greedy-generation exact match."""
    max_new_tokens: int = 48
    """Generation length for exact match."""
    save_every: int = 0
    """Checkpoint every N steps (0: only the final adapter)."""
    resume: bool = False
    """Continue from the latest checkpoint in --output."""
    seed: int = 0
    """Random seed (data order, LoRA init, dropout)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the frozen base; auto: bf16 where the hardware supports it. LoRA weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, more time."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: hold the frozen base's block linears in 4-bit NF4 (double-quantized scales) or int8 (bitsandbytes); LoRA trains in fp32 on top."""
    device: str | None = None
    """cpu, cuda, cuda:1 ...; default: cuda if available."""
    task: Literal["orders", "tickets"] = "orders"
    """Built-in task when --data is omitted: orders (order note -> record) or tickets (route a message to a team)."""
    task_size: int = 960
    """Training samples of the built-in task."""
    preserve: float = 0.0
    """Knowledge preservation: weight of a KL term to the base model's next-token distribution on general text (0: off)."""
    max_forgetting: float = 0.0
    """Forgetting guard: keep the best adapter whose forgetting-probe perplexity rose at most this many percent (0: off)."""
    probe_every: int = 0
    """Forgetting guard: probe every N steps (0: ten times per run)."""
    init_r: int = 12
    """AdaLoRA (--method adalora): singular triplets per module at the start."""
    target_r: int = 4
    """AdaLoRA: average triplets per module left after pruning (the total budget is target_r x modules)."""
    prune_start: float = 0.1
    """AdaLoRA: fraction of the run before pruning starts (importance scores warm up)."""
    prune_end: float = 0.7
    """AdaLoRA: fraction of the run at which the budget reaches target_r; the kept set is fixed after it."""
    importance_beta: float = 0.85
    """AdaLoRA: smoothing of the importance scores and their uncertainty (exponential moving averages)."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the penalty keeping the singular vectors orthonormal."""

    def __post_init__(self) -> None:
        for name in ("r", "batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LorakitError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            raise LorakitError("give --max-steps > 0 or --epochs > 0.")
        if not 0 < self.eval_fraction < 1:
            raise LorakitError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}.")
        if self.quantize != "none" and self.init_lora_weights == "pissa":
            raise LorakitError("--init-lora-weights pissa rewrites the base weights, which --quantize cannot hold "
                               "exactly; use the default init with --quantize.")
        if self.preserve < 0 or self.max_forgetting < 0 or self.probe_every < 0:
            raise LorakitError("--preserve, --max-forgetting and --probe-every must be >= 0.")
        make_methods(self)  # unknown method names and invalid method options fail now, before the model loads
