"""Which llama.cpp architecture a transformers model is, and the GGUF name of each of its weights.

The tensor names come from gguf-py's own table (`gguf.get_tensor_name_map`), the one llama.cpp's
converters use, so `model.layers.3.self_attn.q_proj.weight` becomes `blk.3.attn_q.weight` as it does
in every GGUF file llama.cpp writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.core.errors import LorakitError


@dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture as lorakit writes it.

    Attributes:
        name: gguf.MODEL_ARCH member name (LLAMA, QWEN2).
        permute_qk: llama.cpp's LLAMA graph applies rotary embeddings to interleaved pairs, so its
            converter reorders the rows of W_q and W_k (see permute.py); QWEN2 uses the NeoX layout as is.
    """

    name: str
    permute_qk: bool


# transformers model_type -> llama.cpp architecture (llama.cpp converts Mistral as LLAMA too).
ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),
    "qwen2": Arch("QWEN2", permute_qk=False),
}


def arch_for(config: dict[str, Any]) -> Arch:
    """The llama.cpp architecture of a transformers config dict.

    Raises:
        LorakitError: a model type lorakit does not export.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise LorakitError(
            f"GGUF export supports the model types {', '.join(sorted(ARCHS))}; this model is {model_type!r}. "
            f"Save a transformers model with `lorakit merge` and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return ARCHS[model_type]


def arch_name(arch: Arch) -> str:
    """The value of `general.architecture`, e.g. "llama"."""
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.name]]


class TensorNames:
    """HF parameter name -> GGUF tensor name for one architecture and depth."""

    def __init__(self, arch: Arch, n_blocks: int) -> None:
        import gguf

        self.table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name], n_blocks)

    def get(self, hf_name: str) -> str | None:
        """`blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`; None if llama.cpp has no such tensor."""
        return self.table.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def __getitem__(self, hf_name: str) -> str:
        name = self.get(hf_name)
        if name is None:
            raise LorakitError(f"{hf_name} has no GGUF tensor name in llama.cpp's table; it cannot be exported.")
        return name
