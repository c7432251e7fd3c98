"""`lorakit <command>`: a dict from command name to (config dataclass, function); the dataclass is the CLI."""
from __future__ import annotations

import os
import sys
from typing import Callable

from lorakit.core.errors import LorakitError
from lorakit.serve.http.config import ServeConfig
from lorakit.serve.http.server import run_serve
from lorakit.tools.bench import (
    BenchInferConfig,
    BenchTrainConfig,
    bench_infer,
    bench_train,
)
from lorakit.tools.bench_serve import BenchServeConfig, bench_serve
from lorakit.tools.bench_serve_http import BenchServeLoadConfig, bench_serve_load
from lorakit.tools.compress import CompressConfig, run_compress
from lorakit.tools.export_gguf.command import ExportConfig, run_export, train_then_export
from lorakit.tools.generate import GenerateConfig, run_chat, run_generate
from lorakit.tools.info import InfoConfig, run_info
from lorakit.tools.merge_model import MergeConfig, run_merge
from lorakit.tools.plan import PlanConfig, run_plan
from lorakit.tools.rank import RankConfig, run_rank
from lorakit.tools.sweep import SweepConfig, run_sweep
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import EvalConfig, run_eval

# name -> (config class, function, positional fields, one-line help)
COMMANDS: dict[str, tuple[type, Callable, tuple[str, ...], str]] = {
    "train": (TrainConfig, train_then_export, (), "Fine-tune a model with LoRA (default: the embedded model on the built-in task)."),
    "eval": (EvalConfig, run_eval, (), "Loss, perplexity and exact match of a base model or base + adapter."),
    "generate": (GenerateConfig, run_generate, (), "Generate a reply."),
    "chat": (GenerateConfig, run_chat, (), "Chat interactively."),
    "merge": (MergeConfig, run_merge, (), "Fold an adapter into its base and save a transformers model."),
    "export": (ExportConfig, run_export, ("source",),
               "Write an adapter (or, with --merged, the whole model) as GGUF for llama.cpp and Ollama."),
    "info": (InfoConfig, run_info, ("adapter",), "Describe an adapter directory."),
    "plan": (PlanConfig, run_plan, ("model_or_config",),
             "Parameters, adapter size and training memory of full / LoRA / QLoRA, without loading the model."),
    "bench train": (BenchTrainConfig, bench_train, (), "Training step speed and memory: floor, lorakit, peft, full."),
    "bench infer": (BenchInferConfig, bench_infer, (), "Generation speed: base, unmerged adapter, merged."),
    "bench serve": (BenchServeConfig, bench_serve, (), "Many adapters in one batch: the serving engine vs base, swap, PEFT; batch-1 decoding vs its limits."),
    "bench serve-load": (BenchServeLoadConfig, bench_serve_load, (), "Many concurrent streaming clients against `lorakit serve`: failures, 5xx, memory."),
    "serve": (ServeConfig, run_serve, (), "An OpenAI-compatible HTTP server for the base and many adapters (playground page at /)."),
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
    except OSError as e:  # the filesystem refused a path the user gave (too long, no permission, I/O error)
        where = f" ({str(e.filename)[:200]})" if e.filename else ""
        print(f"lorakit {name}: error: {e.strerror or e}{where}; check the path.", file=sys.stderr)
        return 1
    return 0
