"""A lorakit LoRA adapter as a llama.cpp LoRA GGUF: `<base tensor>.lora_a` (r x d_in) and `.lora_b` (d_out x r).

llama.cpp scales every pair by one file-level `adapter.lora.alpha` over that pair's rank. lorakit's own
scaling can differ per module (rank_pattern, alpha_pattern, rsLoRA's alpha / sqrt(r)), so each lora_B
is multiplied by (lorakit's scaling) / (alpha / r): llama.cpp then computes exactly lorakit's update.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.tools.export_gguf.names import Arch, TensorNames
from lorakit.tools.export_gguf.permute import to_llama_cpp_rows

MERGED_HINT = "export the whole fine-tuned model instead with --merged"


def check_adapter_config(parts: list[tuple[str, Path]], configs: list[dict[str, Any]]) -> None:
    """Refuse adapters that a llama.cpp LoRA file cannot represent (before any model is loaded).

    Args:
        parts: (method name, directory) of each part of the adapter (lorakit.methods.combine.parts_of).
        configs: each part's adapter_config.json.

    Raises:
        LorakitError: several methods, a method other than LoRA, DoRA, modules_to_save or trained biases.
    """
    if len(parts) > 1:
        raise LorakitError(f"the adapter combines {' + '.join(name for name, _ in parts)}; a llama.cpp adapter "
                           f"holds LoRA pairs only: {MERGED_HINT}.")
    (name, _), config = parts[0], configs[0]
    if config.get("peft_type") != "LORA":
        raise LorakitError(f"the adapter is {name} ({config.get('peft_type')}); llama.cpp's adapters are LoRA "
                           f"only: {MERGED_HINT}.")
    lora = LoraConfig.from_dict(config, source=str(parts[0][1]))  # field types checked as load() checks them
    if lora.use_dora:
        raise LorakitError(f"the adapter is DoRA, whose per-row magnitudes llama.cpp's LoRA files cannot hold: "
                           f"{MERGED_HINT}.")
    if lora.modules_to_save:
        raise LorakitError(f"the adapter trains whole modules ({', '.join(lora.modules_to_save)}, "
                           f"modules_to_save), which a llama.cpp LoRA file cannot hold: {MERGED_HINT}.")
    if lora.bias != "none":
        raise LorakitError(f"the adapter trains biases (bias={lora.bias!r}), which a llama.cpp LoRA file "
                           f"cannot hold: {MERGED_HINT}.")


def adapter_pairs(
    model: nn.Module, config: dict[str, Any], arch: Arch, alpha: float, base_tensors: set[str],
    permute_qk: bool | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of every lora_a / lora_b of the model's one LoRA adapter, in llama.cpp's layout.

    Args:
        model: the base model with the adapter loaded (unmerged).
        config: the model's transformers config dict (head counts for the Q/K permutation).
        alpha: the file's `adapter.lora.alpha`; each B is rescaled so that alpha / r times it is lorakit's update.
        base_tensors: the tensor names of the GGUF base the adapter is for.
        permute_qk: override the architecture's Q/K row permutation (False: the classic bug, for tests).

    Raises:
        LorakitError: a LoRA layer other than on a linear layer, or on a tensor the base file lacks.
    """
    from lorakit.core.active import lora_layers
    from lorakit.core.layers import Linear

    names = TensorNames(arch, config["num_hidden_layers"])
    permute = arch.permute_qk if permute_qk is None else permute_qk
    pairs: list[tuple[str, torch.Tensor]] = []
    for module, layer in lora_layers(model):
        if type(layer) is not Linear or layer.fan_in_fan_out:
            raise LorakitError(f"{module} is a {type(layer).__name__} LoRA layer; llama.cpp adapters hold LoRA on "
                               f"linear layers only: {MERGED_HINT}.")
        target = names[f"{module}.weight"]
        if target not in base_tensors:
            raise LorakitError(f"{module} adapts {target}, which the base GGUF file does not have (tied embeddings "
                               f"keep only token_embd.weight): {MERGED_HINT}.")
        for adapter in layer.adapter_names:
            A, B = layer.factors(adapter)
            fold = layer.scaling[adapter] * layer.r[adapter] / alpha  # llama.cpp applies alpha / r
            pairs.append((f"{target}.lora_a", A.detach().float()))
            pairs.append((f"{target}.lora_b", to_llama_cpp_rows(module + ".", B.detach().float() * fold, config,
                                                                permute)))
    if not pairs:
        raise LorakitError("the adapter has no LoRA layers to export.")
    return pairs


def adapter_metadata(alpha: float) -> Any:
    """An `add_metadata` for write_gguf: the keys that make a GGUF file a llama.cpp LoRA adapter."""
    import gguf

    def add(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))

    return add
