"""Tensors in the file's type: f32, f16, bf16 or q8_0, as llama.cpp's converters choose per tensor."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values


def file_type(outtype: OutType) -> int:
    """`general.file_type` (llama.cpp's LLAMA_FTYPE) of a file whose matrices are `outtype`."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def encode(tensor: torch.Tensor, outtype: OutType) -> tuple[np.ndarray, object]:
    """(data, GGMLQuantizationType) of `tensor` for GGUFWriter.add_tensor.

    Vectors (norms, biases) stay f32, as llama.cpp keeps them; q8_0 needs rows that are a multiple of
    32 values, and other matrices (e.g. lora_B with r = 8 columns) fall back to f16 as llama.cpp's
    converters do.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    data = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    kind = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    if data.ndim < 2:
        kind = Q.F32
    elif kind == Q.Q8_0 and data.shape[-1] % Q8_BLOCK:
        kind = Q.F16
    if kind == Q.F32:
        return data, kind
    if kind == Q.F16:
        return data.astype(np.float16), kind
    return gguf.quants.quantize(data, kind), kind
