"""TrainConfig: every option of `lorakit train`, one dataclass whose fields are the command's flags.

Each method's options are a group (a field whose type is a dataclass: `cfg.lora.r`); flags and YAML
keys stay flat (`--r`, `r:`), lorakit.training.config_file maps between the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorakit.core.errors import LorakitError
from lorakit.methods.adalora import AdaLoraOptions
from lorakit.methods.bottleneck import BottleneckOptions
from lorakit.methods.ia3 import IA3Options
from lorakit.methods.lora import LoraOptions
from lorakit.methods.prefix import VirtualTokenOptions
from lorakit.methods.registry import METHODS, make_methods
from lorakit.training.data.sources import parse_columns
from lorakit.training.tracking import check_report_to


# The methods --shard fsdp trains: their factors live inside the blocks they adapt.
SHARDED_METHODS = ("lora", "dora", "pissa")
DEFAULT_PRESERVE = 0.5  # --preserve's default: keeps forgetting under 5% at ~the same task score (README)


@dataclass
class TrainConfig:
    model: str | None = None
    """Base model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face model directory, or a Hub id (org/name) in the local Hugging Face cache."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model (custom architectures); off unless asked."""
    data: str | None = None
    """Training data: a .jsonl/.json/.csv/.parquet/.arrow/.txt file, a glob, a save_to_disk folder, or a dataset name in the local Hugging Face cache. Omitted: the built-in task."""
    format: Literal["auto", "text", "instruction", "chat", "sharegpt"] = "auto"
    """Data format; 'auto' detects it from the first record."""
    split: str = "train"
    """Split of --data (for a dataset name or a save_to_disk folder; files are all 'train')."""
    columns: list[str] = field(default_factory=list)
    """Map the data's column names to lorakit's fields: output=answer,instruction=question."""
    max_samples: int = 0
    """Read at most this many rows of --data (0: all)."""
    streaming: bool = False
    """Read --data lazily (larger-than-RAM data, bounded memory); needs --max-steps."""
    shuffle_buffer: int = 1000
    """--streaming: rows held for shuffling."""
    eval_data: str | None = None
    """Held-out data (same forms as --data); omitted: a split of --data (see --eval-fraction)."""
    eval_split: str = "train"
    """Split of --eval-data."""
    output: str = "runs/lorakit"
    """Run directory: adapter/, checkpoints/, config.yaml, metrics.jsonl, loss.png, report.md."""
    method: str = "lora"
    """Parameter-efficient method: lora, dora, pissa, adalora, ia3, adapter, prefix, prompt (lorakit.methods); several joined by '+', e.g. lora+prefix."""
    method_lr_ratio: dict[str, float] = field(default_factory=dict)
    """Learning-rate multiplier for a method's parameters (JSON, e.g. {"prefix": 10}); a method left out keeps its own (ia3 and prefix 20, prompt 60, the rest 1)."""
    virtual_tokens: VirtualTokenOptions = field(default_factory=VirtualTokenOptions)
    """Prefix and prompt tuning."""
    bottleneck: BottleneckOptions = field(default_factory=BottleneckOptions)
    """Bottleneck adapters (--method adapter)."""
    ia3: IA3Options = field(default_factory=IA3Options)
    """IA3."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA, and the targets and scaling of DoRA, PiSSA and AdaLoRA."""
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
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the decoder layers' training forward/backward (one shared graph; fuses the elementwise work between products). auto: on CPU, for a model of 50M+ parameters and 20+ steps, where measured faster on this machine (once, cached)."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: hold the frozen base's block linears in 4-bit NF4 (double-quantized scales) or int8 (bitsandbytes); LoRA trains in fp32 on top."""
    device: str | None = None
    """cpu, cuda, cuda:1 ...; default: cuda if available."""
    shard: Literal["none", "fsdp"] = "none"
    """Under torchrun: fsdp shards the model (each decoder block, then the rest) across the processes with PyTorch FSDP2, so a base larger than one device trains; none: each process holds the whole model (DDP)."""
    reshard_after_forward: bool = True
    """--shard fsdp: free each block's gathered weights after its forward (less memory, one more all-gather in backward)."""
    cpu_offload: bool = False
    """--shard fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory (FSDP's CPUOffloadPolicy)."""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Experiment trackers besides metrics.jsonl: tensorboard, mlflow (comma-separated), or none."""
    quiet: bool = False
    """No progress display (errors and the final before/after table only)."""
    log_every: int = 0
    """Where the output is not a terminal: one progress line every N steps (0: about 20 lines a run)."""
    task: Literal["orders", "tickets"] = "orders"
    """Built-in task when --data is omitted: orders (order note -> record) or tickets (route a message to a team)."""
    task_size: int = 960
    """Training samples of the built-in task."""
    preserve: float | None = None
    """Knowledge preservation: weight of a KL term to the base model's next-token distributions on general text and chat (0: off; default 0.5, or 0 with --shard fsdp, which does not support it yet)."""
    max_forgetting: float = 0.0
    """Forgetting guard: keep the best adapter whose forgetting-probe perplexity rose at most this many percent (0: off)."""
    probe_every: int = 0
    """Forgetting guard: probe every N steps (0: ten times per run)."""
    export: Literal["none", "gguf", "gguf-merged"] = "none"
    """At the end, write <output>/gguf/ for llama.cpp and Ollama (f16, with a Modelfile): gguf, a LoRA adapter file (--method lora or pissa); gguf-merged, the whole model (any method)."""
    adalora: AdaLoraOptions = field(default_factory=AdaLoraOptions)
    """AdaLoRA's rank schedule."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LorakitError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            raise LorakitError("give --max-steps > 0 or --epochs > 0.")
        if not 0 < self.eval_fraction < 1:
            raise LorakitError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}.")
        if self.quantize != "none" and self.lora.init_lora_weights == "pissa":
            raise LorakitError("--init-lora-weights pissa rewrites the base weights, which --quantize cannot hold "
                               "exactly; use the default init with --quantize.")
        if self.preserve is None:  # measured default (README, Keeping what the model knew)
            self.preserve = 0.0 if self.shard == "fsdp" else DEFAULT_PRESERVE
        if self.preserve < 0 or self.max_forgetting < 0 or self.probe_every < 0:
            raise LorakitError("--preserve, --max-forgetting and --probe-every must be >= 0.")
        unknown = sorted(set(self.method_lr_ratio) - set(METHODS))
        if unknown:
            raise LorakitError(f"--method-lr-ratio names unknown method(s) {', '.join(unknown)}; "
                               f"use names from {', '.join(METHODS)}.")
        check_report_to(self.report_to)
        parse_columns(self.columns)
        if self.streaming and not self.max_steps:
            raise LorakitError("--streaming reads data of unknown length, so give the run's length with --max-steps.")
        if self.max_samples < 0:
            raise LorakitError(f"--max-samples must be 0 (all) or positive, got {self.max_samples}.")
        self.check_shard()
        if self.export == "gguf" and self.method not in ("lora", "pissa"):
            raise LorakitError(f"--export gguf writes a llama.cpp LoRA adapter, which cannot hold --method {self.method}; "
                               f"use --export gguf-merged (the whole fine-tuned model as one GGUF file).")
        make_methods(self)  # unknown method names and invalid method options fail now, before the model loads

    def check_shard(self) -> None:
        """--shard fsdp: the methods and options it is tested with; others are refused, not half-run."""
        if self.shard == "none":
            if self.cpu_offload:
                raise LorakitError("--cpu-offload applies to --shard fsdp; add --shard fsdp or drop --cpu-offload.")
            return
        others = sorted(set(self.method.split("+")) - set(SHARDED_METHODS))
        if others:
            raise LorakitError(f"--shard fsdp trains {', '.join(SHARDED_METHODS)}; not {', '.join(others)}. "
                               "Use one of those methods, or --shard none.")
        if self.quantize == "int8":
            raise LorakitError("--shard fsdp shards floating parameters, and int8 weights are not; use --quantize nf4 "
                               "(its 4-bit codes are stored in the compute dtype for FSDP) or --shard none.")
        if self.preserve > 0 or self.max_forgetting > 0:
            raise LorakitError("--preserve and --max-forgetting are not available with --shard fsdp yet; "
                               "use --preserve 0 and no --max-forgetting, or --shard none.")
