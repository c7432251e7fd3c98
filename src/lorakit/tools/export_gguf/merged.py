"""A whole model (base with the adapter folded in) as one GGUF file llama.cpp runs on its own."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.tools.export_gguf.encode import OutType
from lorakit.tools.export_gguf.metadata import base_key_values, hyperparameters, write_hf_tokenizer
from lorakit.tools.export_gguf.names import Arch, TensorNames, arch_name
from lorakit.tools.export_gguf.permute import to_llama_cpp_rows
from lorakit.tools.export_gguf.writer import write_gguf


def model_tensors(model: nn.Module, config: dict[str, Any], arch: Arch,
                  permute_qk: bool | None = None) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of every weight of a plain transformers model, W_q / W_k in llama.cpp's row order.

    With tied embeddings lm_head is left out: llama.cpp reads token_embd.weight for the output then.

    Raises:
        LorakitError: a weight llama.cpp's table has no name for (a model lorakit cannot export).
    """
    names = TensorNames(arch, config["num_hidden_layers"])
    permute = arch.permute_qk if permute_qk is None else permute_qk
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        out.append((names[hf_name], to_llama_cpp_rows(hf_name, tensor.detach().float(), config, permute)))
    return out


def write_model_gguf(
    path: str | Path, model: nn.Module, config: dict[str, Any], arch: Arch, outtype: OutType,
    base_gguf: str | Path | None = None, hf_dir: str | Path | None = None, tokenizer_pre: str | None = None,
    permute_qk: bool | None = None,
) -> Path:
    """Write `model` as a GGUF file with its base's metadata.

    Args:
        base_gguf: the GGUF file the model came from: all its metadata is carried over.
        hf_dir: else the Hugging Face directory it came from: hyper-parameters from `config`, its tokenizer.
        tokenizer_pre: llama.cpp's pre-tokenizer name for an `hf_dir` tokenizer (None: recognised automatically).

    Raises:
        LorakitError: neither source given, or a model or tokenizer lorakit cannot write.
    """
    tensors = model_tensors(model, config, arch, permute_qk)
    if base_gguf is not None:
        return write_gguf(path, arch_name(arch), tensors, outtype, key_values=base_key_values(base_gguf))
    if hf_dir is None:
        raise LorakitError("write_model_gguf needs base_gguf or hf_dir for the tokenizer and metadata.")

    def add(writer: Any) -> None:
        writer.add_name(Path(hf_dir).name)
        hyperparameters(writer, config)
        write_hf_tokenizer(writer, hf_dir, tokenizer_pre)

    return write_gguf(path, arch_name(arch), tensors, outtype, add_metadata=add)
