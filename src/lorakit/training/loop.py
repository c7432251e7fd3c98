"""`lorakit train`: one readable LoRA training loop, on CPU or GPU, alone or under torchrun.

    setup_run (model, data) -> measure (before) -> build_trainer (methods, optimizer) -> resume
    -> train_step x N (maybe_evaluate, maybe_checkpoint) -> finish (adapter, measure after, report)

Run directory: adapter/ (PEFT format), checkpoints/, config.yaml, metrics.jsonl, loss.png, report.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.adapters import Summary, summary
from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_directory, atomic_write_text
from lorakit.core.quantize import quantize_model
from lorakit.methods.combine import apply_methods, save_methods
from lorakit.methods.registry import make_methods, optimizer_groups
from lorakit.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from lorakit.training.compiled_layers import compile_layers, should_compile
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import save_config
from lorakit.training.data.batching import BatchPlan, collate
from lorakit.training.data.sets import Datasets, load_datasets
from lorakit.training.distributed import World, close_world, init_world, main_first
from lorakit.training.guard import DISK_FULL, RunGuard, disk_full_error
from lorakit.training.evaluate import EvalResult, evaluate, mean_loss, text_perplexity
from lorakit.training.knowledge import (
    ForgettingGuard,
    PreservationLoss,
    chat_preservation_pieces,
    load_trainable_state,
    trainable_state,
)
from lorakit.training.loss import IGNORE_INDEX, loss_sum
from lorakit.training.models import compute_dtype, load_model
from lorakit.training.progress import Progress
from lorakit.training.report import MetricsLog, write_run_report
from lorakit.training.sharded_loading import load_shards, loads_lean
from lorakit.training.sharding import (
    ShardedStep,
    ShardOptions,
    clip_gradients,
    full_trainable,
    is_sharded,
    shard_model,
    shard_report,
)
from lorakit.training.tasks import forgetting_probe_texts
from lorakit.training.tracking import Trackers, eval_metrics, make_trackers, train_metrics


# ---- optimization -----------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: TrainConfig, methods: list) -> torch.optim.Optimizer:
    """AdamW over the parameter groups of `methods`: lr x the method's ratio (cfg.method_lr_ratio, else
    its own) x the group's (LoRA+: the B factors at --loraplus-lr-ratio)."""
    groups = optimizer_groups(methods, model, cfg.lr, cfg.method_lr_ratio)
    # fused: one kernel for all parameters instead of ~10 small ops per LoRA factor (hundreds of them)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warm-up over cfg.warmup_steps, then cfg.schedule's decay (cosine, linear or constant) to total_steps."""
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
        total, _ = loss_sum(self.model, input_ids, attention_mask, labels)
        return total


def save_run_adapter(methods: list, model: nn.Module, directory: Path) -> None:
    """Write what the run's methods trained into `directory` (several: see lorakit.methods.combine)."""
    save_methods(methods, model, directory)


class TrainingDiverged(LorakitError):
    """The loss became NaN or Inf."""


# ---- the run's state --------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run loads before training: where it runs, the base model, its tokenizer, the data."""

    cfg: TrainConfig
    world: World
    out: Path                   # the run directory
    model: nn.Module            # the base in the compute dtype (quantized if asked); methods are applied later
    tokenizer: Any
    source: str                 # the base model as adapter configs record it
    dtype: torch.dtype          # the compute dtype of the frozen base
    data: Datasets
    started: float              # time.perf_counter() when the run began
    trackers: Trackers = field(default_factory=lambda: Trackers([]))   # --report-to (rank 0)
    weights_dir: Path | None = None   # --shard fsdp, loaded lean: the model is on meta until sharded and read

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class Trainer:
    """What trains: the methods applied to the model, the optimizer and schedule, the batches of each step."""

    methods: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step_module: nn.Module      # model + loss; DistributedDataParallel over several processes
    scaler: torch.amp.GradScaler | None   # fp16 only
    plan: BatchPlan
    total_steps: int
    counts: Summary             # trainable / total parameters
    preserve: PreservationLoss | None = None   # --preserve: KL to the base on general text
    guard: ForgettingGuard | None = None       # --max-forgetting (rank 0)
    grad_norm: float = math.nan                # of the last step, before clipping


# ---- the steps --------------------------------------------------------------------------------------
def setup_run(cfg: TrainConfig, world: World, started: float) -> Run:
    """Load the base model (in the compute dtype, quantized if asked) and the data; write config.yaml."""
    torch.manual_seed(cfg.seed)
    dtype = compute_dtype(cfg.precision, world.device)
    lean = cfg.shard == "fsdp" and loads_lean(cfg.method, cfg.lora.init_lora_weights, cfg.quantize)
    with main_first(world):  # rank 0 converts and caches a GGUF model once
        # The frozen base lives in the compute dtype (loaded so: no fp32 copy, no per-step re-cast).
        loaded = load_model(cfg.model, device=world.device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                            empty=lean)
    # Before the 'before' measurement, so that before and after are measured on the same (quantized) base.
    # FSDP shards floating parameters only: 4-bit codes then live in the compute dtype's bits (FSDP-QLoRA).
    quantize_model(loaded.model, cfg.quantize, dtype, quant_storage=dtype if cfg.shard == "fsdp" else torch.uint8)
    data = load_datasets(cfg, loaded.tokenizer, world.size)
    run = Run(cfg, world, Path(cfg.output), loaded.model, loaded.tokenizer, loaded.source, dtype, data, started,
              weights_dir=loaded.directory if lean else None)
    if world.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out / "config.yaml")
        run.trackers = make_trackers(cfg.report_to, run.out, run_name=run.out.name)
        run.trackers.log_config(asdict(cfg))
    return run


def measure(run: Run) -> EvalResult | None:
    """The model as it is now on the held-out set and the forgetting probe (rank 0; None elsewhere).
    A sharded model runs on every process (each forward gathers from all), rank 0 keeps the result."""
    if not run.world.is_main:
        if is_sharded(run.model):
            evaluate(run.model, run.tokenizer, run.data.eval, run.world.device, run.cfg.eval_samples,
                     run.cfg.max_new_tokens)
        return None
    return evaluate(run.model, run.tokenizer, run.data.eval, run.world.device, run.cfg.eval_samples,
                    run.cfg.max_new_tokens)


def build_trainer(run: Run) -> Trainer:
    """Apply the run's methods to the model, then build the optimizer, schedule and batch plan."""
    cfg, world, model = run.cfg, run.world, run.model
    torch.manual_seed(cfg.seed)
    methods = make_methods(cfg)
    apply_methods(methods, model, run.source)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = summary(model, print_summary=False)
    if cfg.shard == "fsdp":  # after the methods (their factors shard with their blocks), before the optimizer
        shard_model(model, world, ShardOptions(cfg.reshard_after_forward, cfg.cpu_offload, run.dtype))
        if run.weights_dir is not None:
            load_shards(model, run.weights_dir, world.device, cfg.seed, cfg.lora.init_lora_weights)
        report = shard_report(model, world)
        if world.is_main:
            atomic_write_text(run.out / "sharding.json", json.dumps(report, indent=2))
    # a stream has no length: TrainConfig asks for --max-steps with --streaming
    plan = BatchPlan(run.data.size or 1, cfg.batch_size, world.size, cfg.grad_accum, cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * run.data.size / plan.global_batch))
    if should_compile(cfg.compile, model, device=world.device, steps=total_steps, tokens=min(cfg.max_seq_len, 256),
                      dtype=run.dtype, single_process=not world.distributed and cfg.shard == "none",
                      plain_layers=cfg.quantize == "none" and not cfg.gradient_checkpointing):
        layers = compile_layers(model)
        if world.is_main and not cfg.quiet:
            print(f"compile: {layers} decoder layers share one compiled graph (the first step compiles it)")
    optimizer = make_optimizer(model, cfg, methods)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    step_module: nn.Module = CausalLMLoss(model)
    if is_sharded(model):
        step_module = ShardedStep(step_module, model)
    elif world.distributed:
        # DDP registers hooks only on parameters that require grad: only LoRA gradients are reduced.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(world.device.type) if run.dtype == torch.float16 else None
    trainer = Trainer(methods, optimizer, scheduler, step_module, scaler, plan, total_steps, counts)
    if cfg.preserve > 0:
        chat = chat_preservation_pieces(run.model, run.tokenizer, world.device)
        trainer.preserve = PreservationLoss(run.tokenizer, cfg.preserve, chat)
    return trainer


def resume(run: Run, trainer: Trainer) -> int:
    """With --resume, restore the latest checkpoint; returns the step to continue from (0: a fresh start)."""
    if not run.cfg.resume:
        return 0
    ckpt, notes = resumable_checkpoint(run.ckpt_dir)
    if run.world.is_main and notes:
        print("\n".join(notes + [f"--resume: using {ckpt or 'no checkpoint (step 0)'} instead."]))
    if ckpt is None:
        if run.world.is_main:
            print(f"--resume: no checkpoint in {run.ckpt_dir}; starting from step 0.")
        return 0
    with full_trainable(run.model, trainer.optimizer):  # a checkpoint holds full tensors, whatever the world size
        step = load_checkpoint(ckpt, run.model, trainer.optimizer, trainer.scheduler)["step"]
    if run.world.is_main:
        print(f"resumed from {ckpt} (step {step})")
    return step


def train_step(run: Run, trainer: Trainer, step: int) -> tuple[float, int]:
    """One optimizer step on step `step`'s global batch.

    Returns:
        The token-mean loss over the global batch, and the tokens it held (all processes, padding excluded).

    Raises:
        TrainingDiverged: the loss is NaN or Inf (the weights are left as they were before the step).
    """
    world = run.world
    micro = [collate(examples, run.tokenizer.pad_token_id)
             for examples in run.data.micro_batches(trainer.plan, step, world.rank)]
    global_tokens = world.sum(sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro))
    loss = world.sum(accumulate_gradients(run, trainer, micro, global_tokens)) / max(global_tokens, 1)
    if trainer.preserve is not None:
        # The preservation batch depends on the step only: every process adds the same gradient, no reduction.
        kl = trainer.preserve(run.model, step, world.device)
        (trainer.scaler.scale(kl) if trainer.scaler else kl).backward()
    if not math.isfinite(loss):
        good = latest_checkpoint(run.ckpt_dir)
        raise TrainingDiverged(
            f"the loss became {loss} at step {step + 1}; stopped before updating the weights. "
            f"Last good checkpoint: {good or 'none'}. Lower --lr or raise --warmup-steps, then --resume."
        )
    update(run, trainer, step)
    return loss, int(world.sum(sum(int(m["attention_mask"].sum()) for m in micro)))


def accumulate_gradients(run: Run, trainer: Trainer, micro: list[dict], global_tokens: float) -> float:
    """Forward and backward over this process's micro-batches; returns the summed loss of their tokens."""
    world, step_module, scaler = run.world, trainer.step_module, trainer.scaler
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
            for method in trainer.methods:
                extra = method.regularizer(run.model)
                if extra is not None:
                    scaled = scaled + extra / len(micro)
            (scaler.scale(scaled) if scaler else scaled).backward()
    return local_loss


def update(run: Run, trainer: Trainer, step: int) -> None:
    """Clip, step the optimizer and the schedule, clear the gradients, and let each method follow the step."""
    optimizer, scaler = trainer.optimizer, trainer.scaler
    if scaler:
        scaler.unscale_(optimizer)
    # max_norm=inf measures the norm without clipping
    params, max_norm = [p for p in run.model.parameters() if p.requires_grad], run.cfg.max_grad_norm or math.inf
    trainer.grad_norm = (clip_gradients(params, max_norm) if is_sharded(run.model)
                         else float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    trainer.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    for method in trainer.methods:
        method.after_step(run.model, step + 1, trainer.total_steps)


def maybe_evaluate(run: Run, trainer: Trainer, step: int) -> dict[str, float]:
    """Every --eval-every steps but the last (rank 0): {"eval_loss": held-out loss}; else {}."""
    n, every = step + 1, run.cfg.eval_every
    if not (every and n % every == 0 and n < trainer.total_steps and (run.world.is_main or is_sharded(run.model))):
        return {}
    loss = mean_loss(run.model, run.data.eval.examples, run.tokenizer.pad_token_id, run.world.device)
    return {"eval_loss": loss} if run.world.is_main else {}


def maybe_checkpoint(run: Run, trainer: Trainer, step: int, loss: float, now: bool = False) -> None:
    """Every --save-every steps but the last (or `now`): rank 0 writes a checkpoint, the others wait for it."""
    n, every = step + 1, run.cfg.save_every
    if not now and not (every and n % every == 0 and n < trainer.total_steps):
        return
    with full_trainable(run.model, trainer.optimizer):
        if run.world.is_main:
            save_checkpoint(run.ckpt_dir, n, run.model, lambda d: save_run_adapter(trainer.methods, run.model, d),
                            trainer.optimizer, trainer.scheduler, {"loss": loss})
    run.world.barrier()


def maybe_probe(run: Run, trainer: Trainer, step: int) -> dict[str, float]:
    """With --max-forgetting, every --probe-every steps and at the last (rank 0): measure forgetting and the
    held-out loss, and let the guard keep the adapter if it is the best within budget."""
    guard, n = trainer.guard, step + 1
    every = run.cfg.probe_every or max(1, trainer.total_steps // 10)
    if guard is None or not (n % every == 0 or n == trainer.total_steps):
        return {}
    device, tok = run.world.device, run.tokenizer
    point = guard.observe(n, text_perplexity(run.model, tok, forgetting_probe_texts(), device),
                          mean_loss(run.model, run.data.eval.examples, tok.pad_token_id, device),
                          snapshot=lambda: trainable_state(run.model))
    run.model.train()
    return {"forgetting_pct": point.forgetting_pct, "probe_eval_loss": point.task_loss}


def finish(run: Run, trainer: Trainer, before: EvalResult | None, tokens_per_s: float | None) -> dict:
    """Rank 0 restores the guard's choice, writes the adapter, measures the model after training and writes
    the report; returns its summary."""
    result: dict = {}
    guard_note = trainer.guard.restore(lambda s: load_trainable_state(run.model, s)) if trainer.guard else None
    with full_trainable(run.model):
        if run.world.is_main:
            with atomic_directory(run.out / "adapter") as tmp:
                save_run_adapter(trainer.methods, run.model, tmp)
    after = measure(run)
    if run.world.is_main:
        run.trackers.log_metrics(eval_metrics(after.to_dict(), "after"), step=trainer.total_steps)
        result = write_run_report(
            run.out, run.cfg, before=before, after=after, counts=trainer.counts, steps=trainer.total_steps,
            tokens_per_s=tokens_per_s, wall_s=time.perf_counter() - run.started, world_size=run.world.size,
            tokenizer=run.tokenizer, guard_note=guard_note,
        )
    run.world.barrier()
    return result


# ---- the loop ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run a whole fine-tune as `cfg` says.

    Args:
        cfg: the run's settings.

    Returns:
        The summary written to summary.json (rank 0; {} on the other processes).

    Raises:
        LorakitError: a model or data problem (before training), or TrainingDiverged.
    """
    started = time.perf_counter()
    world = init_world(cfg.device)
    trackers = Trackers([])
    guard = RunGuard(Path(cfg.output), enabled=world.is_main)
    try:
        guard.__enter__()  # lock, writability, signals: before loading anything
        run = setup_run(cfg, world, started)
        trackers = run.trackers
        # a model loaded lean exists only once sharded: it is measured then (LoRA starts at B = 0: the base)
        trainer = build_trainer(run) if run.weights_dir else None
        before = measure(run)
        if before is not None:
            trackers.log_metrics(eval_metrics(before.to_dict(), "before"), step=0)
        trainer = trainer or build_trainer(run)
        start_step = resume(run, trainer)
        if cfg.max_forgetting > 0 and world.is_main:
            trainer.guard = ForgettingGuard(cfg.max_forgetting, before.probe_perplexity)
        metrics = MetricsLog(run.out / "metrics.jsonl", enabled=world.is_main, truncate_after=start_step)

        run.model.train()
        progress = Progress(trainer.total_steps, start_step, enabled=world.is_main and not cfg.quiet,
                            log_every=cfg.log_every)
        tokens_seen, train_time = 0, 0.0
        for step in range(start_step, trainer.total_steps):
            t0 = time.perf_counter()
            loss, tokens = train_step(run, trainer, step)
            elapsed = time.perf_counter() - t0
            tokens_seen, train_time = tokens_seen + tokens, train_time + elapsed
            record = {"step": step + 1, **run.data.epoch(trainer.plan, step + 1), "loss": loss, "lr": trainer.scheduler.get_last_lr()[0], "grad_norm": trainer.grad_norm,
                      "tokens_per_s": tokens / elapsed, "step_s": elapsed, **maybe_evaluate(run, trainer, step),
                      **maybe_probe(run, trainer, step)}
            metrics.write(record)
            trackers.log_metrics(train_metrics(record), step=step + 1)
            progress.update(record)
            maybe_checkpoint(run, trainer, step, loss, now=guard.stop_signal is not None)
            if guard.stop_signal is not None:
                raise guard.stopped(step + 1, latest_checkpoint(run.ckpt_dir))
        progress.close()

        return finish(run, trainer, before, tokens_seen / train_time if train_time else None)
    except OSError as e:
        trackers.close(failed=True)
        if e.errno not in DISK_FULL:
            raise
        raise disk_full_error(e, "the run's files", latest_checkpoint(Path(cfg.output) / "checkpoints")) from e
    except BaseException:
        trackers.close(failed=True)
        raise
    finally:
        trackers.close()
        guard.__exit__()
        close_world(world)
