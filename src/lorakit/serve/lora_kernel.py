"""The LoRA branch as one compiled call per projection group on the CPU (csrc/lora_update.cpp).

Decoding runs the branch on a few rows, where its arithmetic is tiny and its cost is the number of
kernel calls: as torch ops, a group takes 4-7 of them (cast, A product, a B product per projection, add).
The compiled function does a group in one call (README, Serving, for the measurements). It is built on
first use with torch's C++ extension builder (ninja and the C++ compiler, as DeepSpeed builds its ops),
for this CPU (-march=native) and this torch, into torch's extension directory (TORCH_EXTENSIONS_DIR); a
build takes about 12 s once per machine. Where it cannot be built, `fused_update` says why and the engine
keeps its torch path (`EngineConfig.lora_kernel`).
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_update.cpp"
# x dtype -> factor dtypes the compiled function takes with it
SUPPORTED = {torch.float32: (torch.float32,), torch.bfloat16: (torch.float32, torch.bfloat16)}

Update = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor], None]


def supports(device: torch.device, x_dtype: torch.dtype, factor_dtype: torch.dtype) -> bool:
    """Whether the compiled function takes a model in `x_dtype` with factors in `factor_dtype` on `device`."""
    return device.type == "cpu" and factor_dtype in SUPPORTED.get(x_dtype, ())


def fused_update() -> tuple[Update | None, str]:
    """(the compiled `lora_update_(x, A, Bts, out)`, "") or (None, why it could not be built); built once a process."""
    return _build()


@functools.cache
def _build() -> tuple[Update | None, str]:
    from lorakit.core.autotune import cpu_model

    source = SOURCE.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp"]
    # -march=native: the name carries the CPU, so a home directory shared between machines builds per CPU
    tag = hashlib.sha256(b"\0".join([source, cpu_model().encode(), torch.__version__.encode(), " ".join(flags).encode()]))
    name = f"lorakit_lora_update_{tag.hexdigest()[:12]}"
    scripts = sysconfig.get_path("scripts")  # pip's ninja lives beside this Python, maybe off PATH (no venv activated)
    if shutil.which("ninja") is None and scripts and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    try:
        from torch.utils.cpp_extension import load

        module = load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean the torch path
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        log.warning("lorakit: the compiled LoRA kernel could not be built (%s); using torch ops", reason)
        return None, reason
    return module.lora_update_, ""


def reference_update(x: torch.Tensor, A: torch.Tensor, Bts: list[torch.Tensor], out: torch.Tensor) -> None:
    """What the compiled function computes, as torch ops in fp32 (tests compare the two)."""
    n = x.shape[0]
    h = torch.bmm(x.float().unsqueeze(1), A.float().expand(n, -1, -1).transpose(1, 2)).squeeze(1)  # (n, R)
    first, col = 0, 0
    for Bt in Bts:
        rank, width = Bt.shape[1], Bt.shape[2]
        if rank:
            update = torch.bmm(h[:, first:first + rank].unsqueeze(1), Bt.float().expand(n, -1, -1)).squeeze(1)
            out[:, col:col + width] = (out[:, col:col + width].float() + update).to(out.dtype)
        first, col = first + rank, col + width


def pick(choice: str, device: torch.device, x_dtype: torch.dtype, factor_dtype: torch.dtype) -> Update | None:
    """The engine's LoRA kernel for `EngineConfig.lora_kernel`: "torch" (None: torch ops), "fused" (the compiled
    function, or an error saying why not), "auto" (the compiled function where it applies and builds).

    Raises:
        LorakitError: "fused" on a device or dtypes it does not take, or where it cannot be built.
    """
    if choice == "torch":
        return None
    if not supports(device, x_dtype, factor_dtype):
        if choice == "fused":
            raise LorakitError(f"lora_kernel='fused' runs on the CPU with an fp32 model and fp32 factors or a bf16 model "
                               f"and fp32/bf16 factors, not {device.type} with {x_dtype} and {factor_dtype}: use "
                               f"lora_kernel='auto' or 'torch'.")
        return None
    kernel, reason = fused_update()
    if kernel is None and choice == "fused":
        raise LorakitError(f"lora_kernel='fused' could not be built ({reason}): it needs a C++ compiler and ninja "
                           f"(`pip install ninja`); or use lora_kernel='auto' or 'torch'.")
    return kernel
