"""`lorakit <command>`: a dict from command name to (config dataclass, function); the dataclass is the CLI."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from lorakit.core.errors import LorakitError
from lorakit.tools.bench import (
    BenchInferConfig,
    BenchTrainConfig,
    bench_infer,
    bench_train,
)
from lorakit.tools.bench_serve import BenchServeConfig, bench_serve
from lorakit.tools.compress import CompressConfig, run_compress
from lorakit.tools.plan import PlanConfig, run_plan
from lorakit.tools.rank import RankConfig, run_rank
from lorakit.tools.sweep import SweepConfig, run_sweep
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train


def _base_model_for(model: str | None, adapter: str | None) -> str | None:
    """--model, else the base model recorded in the adapter's config, else the embedded default."""
    if model or not adapter:
        return model
    from lorakit.methods.combine import base_model_of

    return base_model_of(adapter)


def _load(model: str | None, adapter: str | None, device: str | None, precision: str = "auto",
          quantize: str = "none"):
    """The base model (in the compute dtype, quantized if asked) with the adapter (any method, or several)
    applied, and its tokenizer."""
    from lorakit.core.quantize import quantize_model
    from lorakit.methods.combine import load as load_adapter
    from lorakit.training.models import compute_dtype, load_model

    loaded = load_model(_base_model_for(model, adapter), device=device)
    dtype = compute_dtype(precision, loaded.model.device)
    loaded.model.to(dtype)
    quantize_model(loaded.model, quantize, dtype)
    if adapter:
        load_adapter(loaded.model, adapter)
    return loaded


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

    loaded = _load(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
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


# ---- generate / chat --------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    prompt: str | None = None
    """The user message (rendered with the chat template); read from stdin when omitted."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    adapter: str | None = None
    """Adapter directory to apply."""
    max_new_tokens: int = 128
    """Tokens to generate."""
    temperature: float = 0.0
    """0: greedy."""
    raw: bool = False
    """Use the prompt as is, without the chat template."""
    device: str | None = None
    """cpu, cuda ..."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Hold the base's block linears in 4-bit NF4 or int8, as a QLoRA adapter was trained."""


def _reply(loaded, messages_or_text, cfg) -> str:
    import torch

    from lorakit.training.evaluate import stop_token_ids

    tok = loaded.tokenizer
    if isinstance(messages_or_text, str):
        text = messages_or_text
    else:
        text = tok.apply_chat_template(messages_or_text, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(loaded.model.device)
    sample = cfg.temperature > 0
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                    temperature=cfg.temperature if sample else None, top_p=None, top_k=None,
                                    pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok))
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_generate(cfg: GenerateConfig) -> str:
    """Generate one reply from the base model or base + adapter."""
    loaded = _load(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read()
    reply = _reply(loaded, prompt if cfg.raw else [{"role": "user", "content": prompt}], cfg)
    print(reply)
    return reply


def run_chat(cfg: GenerateConfig) -> None:
    """An interactive chat (empty line or Ctrl-D ends it)."""
    loaded = _load(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
    messages: list[dict] = []
    print("lorakit chat: empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = _reply(loaded, messages, cfg)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


# ---- merge / info -----------------------------------------------------------------------------------
@dataclass
class MergeConfig:
    adapter: str | None = None
    """Adapter directory to fold into the base weights."""
    output: str | None = None
    """Where to write the merged transformers model directory."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """dtype of the written weights."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Merge onto the base as a QLoRA adapter saw it: quantized, then dequantized to fp32 (none: the original weights)."""


def run_merge(cfg: MergeConfig) -> Path:
    """Write base + adapter as a standard transformers model directory (AutoModelForCausalLM loads it)."""
    import torch

    from lorakit.core.fsutil import atomic_directory
    from lorakit.core.quantize import quantize_model
    from lorakit.methods.combine import load as load_adapter
    from lorakit.methods.combine import merge_and_unload
    from lorakit.training.models import compute_dtype, load_model

    if not cfg.adapter or not cfg.output:
        raise LorakitError("lorakit merge needs --adapter DIR and --output DIR.")
    loaded = load_model(_base_model_for(cfg.model, cfg.adapter))
    model = loaded.model  # merge in fp32, then cast: no rounding of the update into bf16 before the sum
    quantize_model(model, cfg.quantize, torch.float32)  # merge_and_unload dequantizes it to fp32
    load_adapter(model, cfg.adapter)
    merged = merge_and_unload(model)
    merged.to(compute_dtype(cfg.precision, merged.device))
    with atomic_directory(cfg.output) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    print(f"merged model written to {cfg.output}")
    return Path(cfg.output)


@dataclass
class InfoConfig:
    adapter: str | None = None
    """Adapter directory."""
    json: bool = False
    """Print JSON."""


def run_info(cfg: InfoConfig) -> dict:
    """What an adapter is: base model, targets, ranks, trainable parameters, file size."""
    from safetensors import safe_open

    from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

    if not cfg.adapter:
        raise LorakitError("lorakit info needs an adapter directory: lorakit info DIR.")
    directory = Path(cfg.adapter)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    modules: dict[str, int] = {}
    n_params = 0
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            n_params += n
            if key.endswith(("lora_A.weight", "lora_embedding_A")):
                modules[key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]] = shape[0]
    info = {
        "base_model": config.base_model_name_or_path, "target_modules": config.target_modules,
        "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "adapted_modules": len(modules), "ranks": sorted(set(modules.values())), "parameters": n_params,
        "file_bytes": weights.stat().st_size + (directory / CONFIG_NAME).stat().st_size,
    }
    if cfg.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<16} {value}")
    return info


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
    "bench serve": (BenchServeConfig, bench_serve, (), "Many adapters in one batch: the serving engine vs base, swap, PEFT; batch-1 decoding vs its limits."),
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
