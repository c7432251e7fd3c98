"""`lorakit export RUN_OR_ADAPTER_DIR --to gguf [--merged] --outtype T --output DIR`: files llama.cpp and Ollama run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorakit.core.errors import LorakitError
from lorakit.tools.export_gguf.encode import OutType
from lorakit.training.config import TrainConfig


@dataclass
class ExportConfig:
    source: str | None = None
    """A training run directory (its adapter/ is exported) or an adapter directory."""
    to: Literal["gguf"] = "gguf"
    """Target format: gguf (llama.cpp, Ollama, LM Studio)."""
    merged: bool = False
    """Write the whole fine-tuned model as one GGUF file (any method); default: a llama.cpp LoRA adapter file."""
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """Type of the written matrices (vectors stay f32; q8_0 falls back to f16 for rows not a multiple of 32)."""
    output: str | None = None
    """Directory to write: the .gguf file and an Ollama Modelfile."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    tokenizer_pre: str | None = None
    """llama.cpp's pre-tokenizer name for a Hugging Face base's tokenizer (--merged), when lorakit cannot tell it."""


@dataclass
class ExportResult:
    """What `export_gguf` wrote: the GGUF file, the Modelfile, and the base an adapter file needs."""

    gguf_file: Path
    modelfile: Path
    base: str | None


def adapter_dir_of(source: str | Path) -> Path:
    """The adapter directory of a run directory (its adapter/) or of an adapter directory itself."""
    source = Path(source)
    return source / "adapter" if (source / "adapter").is_dir() else source


def export_gguf(source: str | Path, output: str | Path, merged: bool = False, outtype: OutType = "f16",
                model: str | None = None, tokenizer_pre: str | None = None,
                permute_qk: bool | None = None) -> ExportResult:
    """Export an adapter (or base + adapter merged) as GGUF, with an Ollama Modelfile, into `output` atomically.

    Args:
        source: a run directory or an adapter directory.
        output: the directory to write; it appears complete or not at all.
        merged: one GGUF file of the whole model instead of a llama.cpp LoRA adapter.
        outtype: f32, f16, bf16 or q8_0.
        model: the base model spec; None: the adapter's recorded base.
        tokenizer_pre: see ExportConfig.tokenizer_pre.
        permute_qk: override the Q/K row permutation (False writes the classic bug; tests use it as a control).

    Raises:
        LorakitError: an adapter llama.cpp cannot represent (the message names --merged), a model lorakit
            cannot export, or files that cannot be read.
    """
    from lorakit.core.config import LoraConfig
    from lorakit.core.fsutil import atomic_directory, atomic_write_text
    from lorakit.core.io import read_config_json
    from lorakit.methods.combine import load, merge_and_unload, parts_of
    from lorakit.tools.export_gguf.adapter import adapter_metadata, adapter_pairs, check_adapter_config
    from lorakit.tools.export_gguf.merged import model_tensors, write_model_gguf
    from lorakit.tools.export_gguf.modelfile import modelfile_text
    from lorakit.tools.export_gguf.names import arch_for, arch_name
    from lorakit.tools.export_gguf.writer import write_gguf
    from lorakit.training.loading import base_model_for
    from lorakit.training.models import load_model, model_config_dict, model_file

    adapter_dir = adapter_dir_of(source)
    parts = parts_of(adapter_dir)
    configs = [read_config_json(part) for _, part in parts]
    if not merged:
        check_adapter_config(parts, configs)
    spec = base_model_for(model, str(adapter_dir))
    kind, base_path = model_file(spec)
    config = model_config_dict(spec)
    arch = arch_for(config)
    loaded = load_model(spec, device="cpu")
    base_tensors = {name for name, _ in model_tensors(loaded.model, config, arch)}
    load(loaded.model, adapter_dir)
    with atomic_directory(output) as tmp:
        if merged:
            name, base = f"model-{outtype}.gguf", None
            write_model_gguf(tmp / name, merge_and_unload(loaded.model), config, arch, outtype,
                             base_gguf=base_path if kind == "gguf" else None,
                             hf_dir=base_path if kind == "hf" else None, tokenizer_pre=tokenizer_pre,
                             permute_qk=permute_qk)
        else:
            # PEFT's default when the file leaves lora_alpha out (LoraConfig reads it as load() did)
            alpha = float(LoraConfig.from_dict(configs[0], source=str(adapter_dir)).lora_alpha)
            name, base = f"adapter-{outtype}.gguf", str(base_path)
            pairs = adapter_pairs(loaded.model, config, arch, alpha, base_tensors, permute_qk)
            write_gguf(tmp / name, arch_name(arch), pairs, outtype, add_metadata=adapter_metadata(alpha))
        text = modelfile_text(base or f"./{name}", f"./{name}" if base else None, loaded.tokenizer.chat_template)
        atomic_write_text(tmp / "Modelfile", text)
    output = Path(output)
    return ExportResult(output / name, output / "Modelfile", base)


def train_then_export(cfg: TrainConfig) -> dict:
    """`lorakit train`: train, then with --export gguf[-merged] write <output>/gguf/ (the main process only).

    Returns:
        The run's summary (see lorakit.training.loop.train).
    """
    from lorakit.training.loop import train

    summary = train(cfg)
    if cfg.export != "none" and summary:  # the other processes of a distributed run get {}
        result = export_gguf(cfg.output, Path(cfg.output) / "gguf", merged=cfg.export == "gguf-merged",
                             model=cfg.model)
        print(f"exported {result.gguf_file} and {result.modelfile}")
    return summary


def run_export(cfg: ExportConfig) -> ExportResult:
    """`lorakit export`: write the files and print how to run them.

    Raises:
        LorakitError: no source or --output, or what `export_gguf` raises.
    """
    from lorakit.tools.export_gguf.modelfile import how_to_run

    if not cfg.source or not cfg.output:
        raise LorakitError("lorakit export needs RUN_OR_ADAPTER_DIR and --output DIR, e.g. "
                           "`lorakit export runs/lorakit --to gguf --output runs/lorakit/gguf`.")
    result = export_gguf(cfg.source, cfg.output, cfg.merged, cfg.outtype, cfg.model, cfg.tokenizer_pre)
    size_mb = result.gguf_file.stat().st_size / 2**20
    print(f"wrote {result.gguf_file} ({size_mb:.1f} MiB) and {result.modelfile}")
    print(how_to_run(result.gguf_file.parent, result.gguf_file.name, result.base))
    return result
