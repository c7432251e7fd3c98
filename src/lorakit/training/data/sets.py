"""The sets a run trains and evaluates on: read (or the built-in task), held out, tokenized, packed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.core.errors import LorakitError
from lorakit.training.data.batching import BatchPlan, pack
from lorakit.training.data.records import split_heldout
from lorakit.training.data.sources import DataOptions, read_held_out, read_records, run_options
from lorakit.training.data.stream import StreamBatches, open_stream
from lorakit.training.data.tokenize import tokenize_records
from lorakit.training.tasks import builtin_task
from lorakit.training.ticket_task import ticket_task

# --task name -> the built-in task's generator
BUILTIN_TASKS = {"orders": builtin_task, "tickets": ticket_task}

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig


@dataclass
class EvalSet:
    """What an evaluation measures on: tokenized examples for the loss, raw records for exact match."""

    format: str             # "text", "instruction" or "chat"
    examples: list[dict]    # tokenized: input_ids, labels
    records: list[dict]     # as read: prompts and references for greedy-generation exact match


@dataclass
class Datasets:
    """A training run's data: tokenized (maybe packed) training examples and the held-out set."""

    train: list[dict] | StreamBatches  # tokenized: input_ids, labels (--streaming: read as the run goes)
    eval: EvalSet

    @property
    def size(self) -> int | None:
        """Training examples; None for a stream, whose length is unknown."""
        return None if isinstance(self.train, StreamBatches) else len(self.train)

    def micro_batches(self, plan: BatchPlan, step: int, rank: int) -> list[list[dict]]:
        """Rank `rank`'s examples for each micro-batch of optimizer step `step`: the plan's indices into the
        training list, or the stream's next global batch."""
        if isinstance(self.train, StreamBatches):
            return self.train.micro_batches(step, rank)
        return [[self.train[i] for i in idx] for idx in plan.micro_batches(step, rank)]

    def epoch(self, plan: BatchPlan, steps_done: int) -> dict[str, float]:
        """{"epoch": passes over the training list after `steps_done` steps}; {} for a stream."""
        size = self.size
        return {"epoch": steps_done * plan.global_batch / size} if size else {}


def load_eval_set(path: str | Path | None, tokenizer: Any, format: str = "auto", max_seq_len: int = 512,
                  builtin_samples: int = 100, split: str = "train") -> EvalSet:
    """An evaluation set from a data file, or the built-in task's held-out records.

    Samples longer than `max_seq_len` are cut (evaluation never stops on a long sample).

    Args:
        path: anything `--data` takes (`sources`); None: the built-in task's held-out set.
        tokenizer: the model's tokenizer.
        format: ``"auto"`` (detect), ``"text"``, ``"instruction"`` or ``"chat"``.
        max_seq_len: the longest example, in tokens.
        builtin_samples: how many held-out records of the built-in task.
        split: the split of a dataset name or save_to_disk folder.

    Returns:
        The set, in the file's order.

    Raises:
        LorakitError: the data cannot be read or holds a malformed record (see `read_records`).
    """
    if path is None:
        _, records = builtin_task(n_eval=builtin_samples)
        fmt = "instruction"
    else:
        records, fmt = read_records(str(path), None if format == "auto" else format, DataOptions(split))
    examples = tokenize_records(records, tokenizer, fmt, max_seq_len, truncate=True, source=path)
    return EvalSet(fmt, examples, records)


def load_datasets(cfg: TrainConfig, tokenizer: Any, world_size: int = 1) -> Datasets:
    """The training and held-out sets of a run.

    Without ``cfg.data``: the built-in task. With it: its records (`sources`: --split, --columns,
    --max-samples), and held out either ``cfg.eval_data`` or a deterministic ``cfg.eval_fraction`` of them.
    With ``cfg.streaming``: training batches read as the run goes (`stream.open_stream`).

    Args:
        cfg: the run's settings (data, eval_data, format, eval_fraction, seed, task_size, eval_samples,
            max_seq_len, truncate, train_on_prompt, packing).
        tokenizer: the model's tokenizer.
        world_size: processes (a stream gives each its slice of every batch).

    Returns:
        The tokenized sets.

    Raises:
        LorakitError: unreadable or malformed data, an over-long sample without ``truncate``, or no
            training sample left.
    """
    fmt = None if cfg.format == "auto" else cfg.format
    if cfg.data is not None and cfg.streaming:
        fmt, batches, examples, records = open_stream(cfg, tokenizer, world_size)
        return Datasets(batches, EvalSet(fmt, examples, records))
    if cfg.data is None:
        train_records, eval_records = BUILTIN_TASKS[cfg.task](n_train=cfg.task_size, n_eval=cfg.eval_samples, seed=0)
        fmt = "instruction"
    else:
        train_records, fmt = read_records(cfg.data, fmt, run_options(cfg))
        if cfg.eval_data:
            eval_records = read_held_out(cfg, fmt)
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
    return Datasets(train, EvalSet(fmt, evals, eval_records))
