"""`lorakit train`: one readable LoRA training loop, on CPU or GPU, alone or under torchrun.

    load model -> load data -> measure before -> apply LoRA -> train (checkpoints) -> measure after -> report

Run directory: adapter/ (PEFT format), checkpoints/, config.yaml, metrics.jsonl, loss.png, report.md.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .errors import LorakitError

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
    task_size: int = 960
    """Training samples of the built-in task."""
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
        from .methods import make_methods

        make_methods(self)  # unknown method names and invalid method options fail now, before the model loads


def lora_config(cfg: TrainConfig, source: str):
    from .config import LoraConfig

    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        base_model_name_or_path=source, task_type="CAUSAL_LM",
    )


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    from .models import default_dtype

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(precision) or default_dtype(device)


# ---- data -------------------------------------------------------------------------------------------
@dataclass
class Datasets:
    format: str
    train: list[dict]           # tokenized: input_ids, labels
    eval: list[dict]
    eval_records: list[dict]    # raw, for generation exact match


def load_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    from .data import load_records, pack, split_heldout, tokenize_records
    from .tasks import builtin_task

    fmt = None if cfg.format == "auto" else cfg.format
    if cfg.data is None:
        train_records, eval_records = builtin_task(n_train=cfg.task_size, n_eval=cfg.eval_samples, seed=0)
        fmt = "instruction"
    else:
        train_records, fmt = load_records(cfg.data, fmt)
        if cfg.eval_data:
            eval_records, _ = load_records(cfg.eval_data, fmt)
        else:
            train_records, eval_records = split_heldout(train_records, cfg.eval_fraction, seed=cfg.seed)
    tok = dict(tokenizer=tokenizer, format=fmt, max_seq_len=cfg.max_seq_len, truncate=cfg.truncate,
               train_on_prompt=cfg.train_on_prompt)
    train = tokenize_records(train_records, source=cfg.data, **tok)
    evals = tokenize_records(eval_records, source=cfg.eval_data or cfg.data, **tok)
    if cfg.packing:
        train = pack(train, cfg.max_seq_len)
    if not train:
        raise LorakitError(f"{cfg.data}: no training samples left after the held-out split; add data.")
    return Datasets(fmt, train, evals, eval_records)


class BatchPlan:
    """Which samples each (step, micro-batch, rank) gets: a deterministic function of the seed, so a
    resumed run sees exactly the batches an uninterrupted one would.

    The sample stream is epoch 0's permutation, then epoch 1's, ...; step s uses the next
    global_batch = batch_size x world_size x grad_accum samples, rank k a contiguous slice of each micro-batch.
    """

    def __init__(self, n: int, batch_size: int, world_size: int, grad_accum: int, seed: int) -> None:
        self.n, self.b, self.w, self.accum, self.seed = n, batch_size, world_size, grad_accum, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.b * self.w * self.accum

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._perms[epoch][offset])

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        start = step * self.global_batch
        return [[self._index(start + m * self.b * self.w + rank * self.b + i) for i in range(self.b)]
                for m in range(self.accum)]


# ---- optimization -----------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: TrainConfig, owners: dict[str, list] | None = None) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; with LoRA+ the B factors get lr x loraplus_lr_ratio, and the
    parameters of each method in `owners` ({method name: parameters}) lr x its cfg.method_lr_ratio."""
    ratio = {id(p): cfg.method_lr_ratio.get(name, 1.0) for name, params in (owners or {}).items() for p in params}
    by_lr: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = cfg.lr * ratio.get(id(param), 1.0)
            if ".lora_B." in name or ".lora_embedding_B." in name:
                lr *= cfg.loraplus_lr_ratio
            by_lr.setdefault(lr, []).append(param)
    groups = [{"params": params, "lr": lr} for lr, params in by_lr.items()]
    # fused: one kernel for all parameters instead of ~10 small ops per LoRA factor (hundreds of them)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CausalLMLoss(nn.Module):
    """The model plus its loss in one forward, so DistributedDataParallel sees the whole step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        from .loss import loss_sum

        total, _ = loss_sum(self.model, input_ids, attention_mask, labels)
        return total


def save_run_adapter(methods: list, model: nn.Module, directory: Path) -> None:
    """Write what the run's methods trained into `directory` (several: see lorakit.combine)."""
    from .combine import save_methods

    save_methods(methods, model, directory)


class TrainingDiverged(LorakitError):
    """The loss became NaN or Inf."""


# ---- the run ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run a whole fine-tune as `cfg` says; returns the summary written to report.md (rank 0)."""
    from tqdm import tqdm

    from . import report
    from .adapters import summary
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .cliargs import save_config
    from .data import collate
    from .fsutil import atomic_directory
    from .distributed import close_world, init_world, main_first
    from .combine import apply_methods
    from .methods import make_methods
    from .models import load_model
    from .quantize import quantize_model

    started = time.perf_counter()
    world = init_world(cfg.device)
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    try:
        torch.manual_seed(cfg.seed)
        dtype = compute_dtype(cfg.precision, world.device)
        with main_first(world):  # rank 0 converts and caches a GGUF model once
            # The frozen base lives in the compute dtype (loaded so: no fp32 copy, no per-step re-cast).
            loaded = load_model(cfg.model, device=world.device, dtype=dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
        # Before the 'before' measurement, so that before and after are measured on the same (quantized) base.
        quantize_model(model, cfg.quantize, dtype)
        data = load_datasets(cfg, tokenizer)
        pad_id = tokenizer.pad_token_id
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")

        before = report.measure(model, tokenizer, data, cfg, world.device) if world.is_main else None

        torch.manual_seed(cfg.seed)
        methods = make_methods(cfg)
        owners = apply_methods(methods, model, loaded.source)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        counts = summary(model, print_summary=False)
        plan = BatchPlan(len(data.train), cfg.batch_size, world.size, cfg.grad_accum, cfg.seed)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.train) / plan.global_batch))
        optimizer = make_optimizer(model, cfg, owners)
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        step_module: nn.Module = CausalLMLoss(model)
        if world.distributed:
            # DDP registers hooks only on parameters that require grad: only LoRA gradients are reduced.
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(world.device.type) if dtype == torch.float16 else None

        start_step = 0
        if cfg.resume:
            ckpt = latest_checkpoint(ckpt_dir)
            if ckpt is None:
                if world.is_main:
                    print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0.")
            else:
                start_step = load_checkpoint(ckpt, model, optimizer, scheduler)["step"]
                if world.is_main:
                    print(f"resumed from {ckpt} (step {start_step})")
        metrics = report.MetricsLog(out / "metrics.jsonl", enabled=world.is_main, truncate_after=start_step)

        model.train()
        bar = tqdm(total=total_steps, initial=start_step, disable=not world.is_main, desc="train", dynamic_ncols=True)
        tokens_seen, train_time = 0, 0.0
        last_loss = float("nan")
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            micro = [collate([data.train[i] for i in idx], pad_id) for idx in plan.micro_batches(step, world.rank)]
            local_tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
            global_tokens = world.sum(local_tokens)
            local_loss = 0.0
            for k, batch in enumerate(micro):
                batch = {key: v.to(world.device) for key, v in batch.items()}
                sync = k == len(micro) - 1 or not world.distributed
                with step_module.no_sync() if not sync else contextlib.nullcontext():
                    loss = step_module(batch["input_ids"], batch["attention_mask"], batch["labels"])
                    local_loss += float(loss.detach())
                    # DDP averages gradients over ranks; scaling by world size / global tokens makes the
                    # result the exact token-mean over the global batch.
                    scaled = loss * (world.size / max(global_tokens, 1))
                    for method in methods:
                        extra = method.regularizer(model)
                        if extra is not None:
                            scaled = scaled + extra / len(micro)
                    (scaler.scale(scaled) if scaler else scaled).backward()
            last_loss = world.sum(local_loss) / max(global_tokens, 1)
            if not math.isfinite(last_loss):
                good = latest_checkpoint(ckpt_dir)
                raise TrainingDiverged(
                    f"the loss became {last_loss} at step {step + 1}; stopped before updating the weights. "
                    f"Last good checkpoint: {good or 'none'}. Lower --lr or raise --warmup-steps, then --resume."
                )
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for method in methods:
                method.after_step(model, step + 1, total_steps)

            elapsed = time.perf_counter() - t0
            step_tokens = int(world.sum(sum(int(m["attention_mask"].sum()) for m in micro)))
            tokens_seen += step_tokens
            train_time += elapsed
            record = {"step": step + 1, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": step_tokens / elapsed, "step_s": elapsed}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps and world.is_main:
                record["eval_loss"] = report.heldout_loss(model, data, pad_id, world.device)
            metrics.write(record)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_seen / train_time:.0f}")
            bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                if world.is_main:
                    save_checkpoint(ckpt_dir, step + 1, model, lambda d: save_run_adapter(methods, model, d),
                                    optimizer, scheduler, {"loss": last_loss})
                world.barrier()
        bar.close()

        result: dict = {}
        if world.is_main:
            with atomic_directory(out / "adapter") as tmp:
                save_run_adapter(methods, model, tmp)
            after = report.measure(model, tokenizer, data, cfg, world.device)
            result = report.write_run_report(
                out, cfg, before=before, after=after, counts=counts, steps=total_steps,
                tokens_per_s=tokens_seen / train_time if train_time else None,
                wall_s=time.perf_counter() - started, world_size=world.size,
            )
        world.barrier()
        return result
    finally:
        close_world(world)
