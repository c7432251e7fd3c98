"""The LoRA branch of the decoding rows as one compiled call per projection group, on the CPU
(csrc/decode_kernels.cpp: Punica's BGMV, each row reading its own adapter's factors where they lie); the same
build holds a bf16 matrix-vector product for batch-1 decoding (`gemv_kernel`, used by lorakit.serve.weights), a
whole bf16 decoding step (`step_kernel`, lorakit.serve.decode_step), new prompts' attention
(`prefill_attention_kernel`) and new prompts' LoRA branch (`segments_kernel`, csrc/lora_segments.cpp).

Decoding runs the branch on a few rows, where its arithmetic is tiny and its cost is the number of kernel
calls (as torch ops a group takes 4-7: cast, A product, a B product per projection, add) and, for batched
matmuls, the per-row copies of the factors. The compiled function does a group in one call (README, Serving,
for the measurements). It is built on first use with torch's C++ extension builder (ninja and the C++
compiler, as DeepSpeed builds its ops), for this CPU (-march=native) and this torch, into torch's extension
directory (TORCH_EXTENSIONS_DIR); a build takes about 12 s, once per machine. Where it cannot be built,
`build_kernel` says why and the engine keeps its torch ops (`EngineConfig.lora_strategy`).

The kernel's table (`kernel_table`) holds the addresses of an adapter's factors: whoever calls the kernel
keeps the adapter alive (`FusedPlan` holds its adapters).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Callable

import torch

from lorakit.core.errors import LorakitError
from lorakit.serve.adapters import GroupFactors

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "decode_kernels.cpp", CSRC / "decode_step.cpp", CSRC / "lora_segments.cpp", CSRC / "tiles.cpp")  # built together
HEADERS = (CSRC / "kernels.h", CSRC / "simd.h")
# x dtype -> factor dtypes the compiled function takes with it
SUPPORTED = {torch.float32: (torch.float32,), torch.bfloat16: (torch.float32, torch.bfloat16)}

# lora_rows_(x (n, d_in), out (n, d_out), table (rows, 3 + 3 * blocks) int64, widths, bf16 factors) -> None
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], bool], None]


def supports(device: torch.device, x_dtype: torch.dtype, factor_dtype: torch.dtype) -> bool:
    """Whether the compiled function takes a model in `x_dtype` with factors in `factor_dtype` on `device`."""
    return device.type == "cpu" and factor_dtype in SUPPORTED.get(x_dtype, ())


def build_kernel() -> tuple[Kernel | None, str]:
    """(the compiled `lora_rows_`, "") or (None, why it could not be built); built once a process."""
    module, reason = _build()
    return (None if module is None else module.lora_rows_), reason


# lora_segments_(x (T, d_in), out (T, d_out), table (segments, 3 + 3 * blocks) int64, lengths (segments) int64,
#                widths, bf16 factors) -> None
SegmentKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], bool], None]


def segments_kernel() -> SegmentKernel | None:
    """The compiled `lora_segments_` (new prompts' LoRA update, one call per group: csrc/lora_segments.cpp), or None
    where the build failed. Its AVX-512 BF16 path runs bf16 models with bf16 factors; elsewhere it runs each token
    as lora_rows_ does."""
    module, _ = _build()
    return None if module is None else module.lora_segments_


def gemv_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
    """The compiled `bf16_gemv_(x, W, out)` (out = x W^T, bf16, x of at most 16 rows), or None where the build
    failed or the CPU has no AVX-512 BF16."""
    return _bf16_function("bf16_gemv_")


def tiles_kernel() -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                            Callable[[torch.Tensor], torch.Tensor]] | None:
    """(the compiled `bf16_tiles_(x, tiles, out)`: out = x W^T for bf16 x of any rows over W's tiled copy,
    `tile_weight_(W)`: that copy), or None where the build failed or the CPU has no AVX-512 BF16."""
    product, tile = _bf16_function("bf16_tiles_"), _bf16_function("tile_weight_")
    return None if product is None else (product, tile)


def prefill_attention_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor] | None:
    """The compiled `prefill_attention_(q, keys, values, length, scale)`: causal attention of one bf16 prompt
    (q (length, heads, head_dim)) over its keys and values in its cache slot ((kv_heads, max_seq_len, head_dim));
    returns (length, heads * head_dim). None where the build failed or the CPU has no AVX-512 BF16."""
    return _bf16_function("prefill_attention_")


def step_kernel() -> Callable[..., torch.Tensor] | None:
    """The compiled `decode_step_` (a whole bf16 decoding step of a Llama-family model; csrc/decode_step.cpp), or
    None where the build failed or the CPU has no AVX-512 BF16 (it runs its products with bf16_gemv_)."""
    return _bf16_function("decode_step_")


def _bf16_function(name: str) -> Callable | None:
    """The compiled module's AVX-512 BF16 function `name`, or None where the build failed or the CPU lacks it."""
    module, _ = _build()
    return getattr(module, name) if module is not None and module.has_bf16_gemv() else None


@functools.cache
def _build():  # -> (the compiled module or None, why not)
    from lorakit.core.autotune import cpu_model

    source = b"\0".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    flags = ["-O3", "-march=native", "-fopenmp"]
    # -march=native: the name carries the CPU, so a home directory shared between machines builds per CPU
    tag = hashlib.sha256(b"\0".join([source, cpu_model().encode(), torch.__version__.encode(), " ".join(flags).encode()]))
    name = f"lorakit_lora_rows_{tag.hexdigest()[:12]}"
    scripts = sysconfig.get_path("scripts")  # pip's ninja lives beside this Python, maybe off PATH (no venv activated)
    if shutil.which("ninja") is None and scripts and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    try:
        from torch.utils.cpp_extension import load

        module = load(name, [str(path) for path in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean torch ops
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"
        log.warning("lorakit: the compiled LoRA kernel could not be built (%s); using torch ops", reason)
        return None, reason
    return module, ""


def kernel_table(factors: GroupFactors) -> torch.Tensor:
    """(layers, 3 + 3 * projections) int64: per layer [row (0: the caller sets it), A, g, then per projection: Bt,
    rank, Bt's row stride], as addresses into `factors`; all zero in layers the adapter leaves alone.
    Computed once per adapter and group (kept on `factors`)."""
    if factors.kernel_table is not None:
        return factors.kernel_table
    A, Bt, g = factors.A, factors.Bt, factors.g
    if A.stride(2) != 1 or A.stride(1) != A.shape[2] or Bt.stride(2) != 1 or (g is not None and g.stride(1) != 1):
        raise ValueError("kernel_table: the factors must be contiguous within a layer")
    layers, size = A.shape[0], A.element_size()
    index = torch.arange(layers, dtype=torch.long)
    table = torch.zeros(layers, 3 + 3 * len(factors.ranks), dtype=torch.long)
    table[:, 1] = A.data_ptr() + index * A.stride(0) * size
    if g is not None:
        table[:, 2] = g.data_ptr() + index * g.stride(0) * size
    first, col = 0, 0
    for block, (rank, width) in enumerate(zip(factors.ranks, factors.widths)):
        if rank:
            table[:, 3 + 3 * block] = Bt.data_ptr() + (index * Bt.stride(0) + first * Bt.stride(1) + col) * size
            table[:, 4 + 3 * block] = rank
            table[:, 5 + 3 * block] = Bt.stride(1)
        first, col = first + rank, col + width
    table[~torch.tensor(factors.present, dtype=torch.bool)] = 0
    factors.kernel_table = table
    return table


def pick(strategy: str, device: torch.device, x_dtype: torch.dtype, factor_dtype: torch.dtype) -> Kernel | None:
    """The compiled kernel for `EngineConfig.lora_strategy`: None for "gather" and "segment" (torch ops); for
    "fused" the kernel or an error saying why not; for "auto" the kernel where it applies and builds, else None.

    Raises:
        LorakitError: "fused" on a device or dtypes it does not take, or where it cannot be built.
    """
    if strategy not in ("auto", "fused"):
        return None
    if not supports(device, x_dtype, factor_dtype):
        if strategy == "fused":
            raise LorakitError(f"lora_strategy='fused' runs on the CPU with an fp32 model and fp32 factors or a bf16 "
                               f"model and fp32/bf16 factors, not {device.type} with {x_dtype} and {factor_dtype}: use "
                               f"lora_strategy='auto', 'gather' or 'segment'.")
        return None
    kernel, reason = build_kernel()
    if kernel is None and strategy == "fused":
        raise LorakitError(f"lora_strategy='fused' could not be built ({reason}): it needs a C++ compiler and ninja "
                           f"(`pip install ninja`); or use lora_strategy='auto', 'gather' or 'segment'.")
    return kernel
