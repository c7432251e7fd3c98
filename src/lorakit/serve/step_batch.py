"""The tokens of one forward of the engine's runner (lorakit.serve.llama), as the engine packs them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.serve.multi_lora import LoraBatch


@dataclass
class StepBatch:
    """The tokens of one forward.

    Attributes:
        tokens: (N,) ids: one per decoding row, then each new prompt.
        positions: (N,) each token's position in its sequence.
        n_decode: decoding rows (cache slots 0..n_decode-1, one token each).
        prefills: (cache slot, first token index, length) of each new prompt.
        logit_rows: (M,) indices of the tokens whose next-token logits are wanted.
        lora: the LoRA branch of these rows (None: every row on the base).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    n_decode: int
    prefills: list[tuple[int, int, int]]
    logit_rows: torch.Tensor
    lora: LoraBatch | None
