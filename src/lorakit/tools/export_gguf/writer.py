"""One GGUF file from its metadata and tensors (gguf-py's GGUFWriter), in the file's type."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from lorakit.tools.export_gguf.encode import OutType, encode, file_type
from lorakit.tools.export_gguf.metadata import KeyValues


def write_gguf(
    path: str | Path,
    architecture: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    outtype: OutType,
    key_values: KeyValues = (),
    add_metadata: Callable[[Any], None] = lambda writer: None,
) -> Path:
    """Write a GGUF file: `general.architecture`, `key_values`, whatever `add_metadata(writer)` adds, `tensors`.

    Args:
        path: the file; the caller writes into a temporary directory that is renamed when complete.
        tensors: (GGUF tensor name, tensor) pairs, in file order.
        outtype: the type of the matrices (see encode.encode).

    Returns:
        The path.
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value, vtype, sub_type in key_values:
        writer.add_key_value(key, value, vtype, sub_type)
    add_metadata(writer)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, tensor in tensors:
        data, kind = encode(tensor, outtype)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
