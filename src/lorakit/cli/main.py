"""`lorakit <command>`: a dict from command name to (config dataclass, function); the dataclass is the CLI."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Literal

from lorakit.core.errors import LorakitError
from lorakit.tools.bench import (
    BenchInferConfig,
    BenchTrainConfig,
    bench_infer,
    bench_train,
)
from lorakit.tools.compress import CompressConfig, run_compress
from lorakit.tools.generate import GenerateConfig, run_chat, run_generate
from lorakit.tools.info import InfoConfig, run_info
from lorakit.tools.merge_model import MergeConfig, run_merge
from lorakit.tools.plan import PlanConfig, run_plan
from lorakit.tools.rank import RankConfig, run_rank
from lorakit.tools.sweep import SweepConfig, run_sweep
from lorakit.training.config import TrainConfig
from lorakit.training.loading import load_with_adapter
from lorakit.training.loop import train


# ---- eval -------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    data: str | None = None
    """Evaluation data (.jsonl/.csv/.txt); omitted: the built-in task's held-out set."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    adapter: str | None = None
    """Adapter directory (PEFT format) to evaluate on top of the base."""
    format: Literal["auto", "text", "instruction", "chat"] = "auto"
    """Data format."""
    max_seq_len: int = 512
    """Longest sample in tokens."""
    eval_samples: int = 100
    """Samples for greedy-generation exact match."""
    max_new_tokens: int = 48
    """Generation length."""
    json: bool = False
    """Print a JSON object instead of a table."""
    device: str | None = None
    """cpu, cuda ..."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Hold the base's block linears in 4-bit NF4 or int8, as a QLoRA adapter was trained."""


def run_eval(cfg: EvalConfig) -> dict:
    """Loss and perplexity; for instruction/chat data also greedy generation exact match."""
    from lorakit.training.data import load_records, tokenize_records
    from lorakit.training.loop import Datasets
    from lorakit.training.report import measure
    from lorakit.training.tasks import builtin_task

    loaded = load_with_adapter(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
    if cfg.data is None:
        _, records = builtin_task(n_eval=cfg.eval_samples)
        fmt = "instruction"
    else:
        records, fmt = load_records(cfg.data, None if cfg.format == "auto" else cfg.format)
    examples = tokenize_records(records, loaded.tokenizer, fmt, cfg.max_seq_len, truncate=True, source=cfg.data)
    result = measure(loaded.model, loaded.tokenizer, Datasets(fmt, [], examples, records), cfg, loaded.model.device)
    out = {k: v for k, v in result.to_dict().items() if k != "samples"}
    if cfg.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key:<18} {value}")
    return out


# name -> (config class, function, positional fields, one-line help)
COMMANDS: dict[str, tuple[type, Callable, tuple[str, ...], str]] = {
    "train": (TrainConfig, train, (), "Fine-tune a model with LoRA (default: the embedded model on the built-in task)."),
    "eval": (EvalConfig, run_eval, (), "Loss, perplexity and exact match of a base model or base + adapter."),
    "generate": (GenerateConfig, run_generate, (), "Generate a reply."),
    "chat": (GenerateConfig, run_chat, (), "Chat interactively."),
    "merge": (MergeConfig, run_merge, (), "Fold an adapter into its base and save a transformers model."),
    "info": (InfoConfig, run_info, ("adapter",), "Describe an adapter directory."),
    "plan": (PlanConfig, run_plan, ("model_or_config",),
             "Parameters, adapter size and training memory of full / LoRA / QLoRA, without loading the model."),
    "bench train": (BenchTrainConfig, bench_train, (), "Training step speed and memory: floor, lorakit, peft, full."),
    "bench infer": (BenchInferConfig, bench_infer, (), "Generation speed: base, unmerged adapter, merged."),
    "rank": (RankConfig, run_rank, ("adapter",), "Singular values and effective rank of each module's update; suggested rank_pattern."),
    "compress": (CompressConfig, run_compress, ("adapter",), "Cut an adapter's per-module rank by SVD (--rank N or --energy X)."),
    "sweep": (SweepConfig, run_sweep, (), "Train at several --ranks (or --methods) and compare quality, size, speed, memory."),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lorakit` command."""
    from lorakit.cli.args import parse_config

    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # commands are one word ("train") or two ("bench train")
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if name not in COMMANDS:
        lines = ["usage: lorakit <command> [flags]   (lorakit <command> --help for its flags)", "", "commands:"]
        lines += [f"  {cmd:<12} {help_}" for cmd, (_, _, _, help_) in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    rest = argv[len(name.split()):]
    cls, fn, positional, help_ = COMMANDS[name]
    try:
        cfg = parse_config(cls, rest, prog=f"lorakit {name}", description=help_, positional=positional)
        fn(cfg)
    except LorakitError as e:
        print(f"lorakit {name}: error: {e}", file=sys.stderr)
        return 1
    return 0
