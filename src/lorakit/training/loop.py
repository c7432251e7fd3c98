"""`lorakit train`: one readable LoRA training loop, on CPU or GPU, alone or under torchrun.

    load model -> load data -> measure before -> apply LoRA -> train (checkpoints) -> measure after -> report

Run directory: adapter/ (PEFT format), checkpoints/, config.yaml, metrics.jsonl, loss.png, report.md.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.training.config import TrainConfig
from lorakit.training.models import compute_dtype


# ---- data -------------------------------------------------------------------------------------------
@dataclass
class Datasets:
    format: str
    train: list[dict]           # tokenized: input_ids, labels
    eval: list[dict]
    eval_records: list[dict]    # raw, for generation exact match


def load_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    from lorakit.training.data import (
        load_records,
        pack,
        split_heldout,
        tokenize_records,
    )
    from lorakit.training.tasks import builtin_task

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
        from lorakit.training.loss import loss_sum

        total, _ = loss_sum(self.model, input_ids, attention_mask, labels)
        return total


def save_run_adapter(methods: list, model: nn.Module, directory: Path) -> None:
    """Write what the run's methods trained into `directory` (several: see lorakit.combine)."""
    from lorakit.methods.combine import save_methods

    save_methods(methods, model, directory)


class TrainingDiverged(LorakitError):
    """The loss became NaN or Inf."""


# ---- the run ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run a whole fine-tune as `cfg` says; returns the summary written to report.md (rank 0)."""
    from tqdm import tqdm

    from lorakit.core.adapters import summary
    from lorakit.core.fsutil import atomic_directory
    from lorakit.core.quantize import quantize_model
    from lorakit.methods.combine import apply_methods
    from lorakit.methods.registry import make_methods
    from lorakit.training import report
    from lorakit.training.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from lorakit.training.config_file import save_config
    from lorakit.training.data import collate
    from lorakit.training.distributed import close_world, init_world, main_first
    from lorakit.training.models import load_model

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
