"""Batching tokenized examples: packing them into fixed-length blocks, choosing each step's samples
(`BatchPlan`), and collating a batch into tensors."""
from __future__ import annotations

import torch

from lorakit.core.errors import LorakitError
from lorakit.training.loss import IGNORE_INDEX


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate tokenized examples and cut the stream into blocks of ``seq_len`` tokens.

    Every block but possibly the last is exactly ``seq_len`` long; labels travel with their
    tokens, so masking is preserved. Blocks that would add no loss (a tail under 2 tokens, or
    no trained label) are left out. Attention is NOT blocked at sample boundaries: a token
    may attend to the end of the previous sample in its block. That is the usual trade-off
    of packing (no padding waste) and is harmless when samples end with EOS.

    Args:
        examples: ``{"input_ids", "labels"}`` dicts from ``tokenize_records``.
        seq_len: block length in tokens.

    Returns:
        A list of ``{"input_ids", "labels"}`` blocks.

    Raises:
        LorakitError: ``seq_len < 2``.
    """
    if seq_len < 2:
        raise LorakitError(f"The packing length must be at least 2 tokens, got {seq_len}.")
    input_ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    blocks = []
    for start in range(0, len(input_ids), seq_len):
        block_labels = labels[start : start + seq_len]
        if len(block_labels) > 1 and any(label != IGNORE_INDEX for label in block_labels):
            blocks.append({"input_ids": input_ids[start : start + seq_len], "labels": block_labels})
    return blocks


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one and stack them.

    Args:
        batch: ``{"input_ids", "labels"}`` dicts of lists of ints.
        pad_id: token id written into padded positions of ``input_ids``.

    Returns:
        int64 tensors of shape ``(batch, longest)``: ``input_ids``, ``attention_mask``
        (1 on real tokens, 0 on pads) and ``labels`` (``IGNORE_INDEX`` on pads).

    Raises:
        LorakitError: the batch is empty.
    """
    if not batch:
        raise LorakitError("Cannot collate an empty batch; check that the dataset is not empty.")
    longest = max(len(e["input_ids"]) for e in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchPlan:
    """Which samples each (step, micro-batch, rank) gets: a deterministic function of the seed, so a
    resumed run sees exactly the batches an uninterrupted one would.

    The sample stream is epoch 0's permutation, then epoch 1's, ...; step s uses the next
    global_batch = batch_size x world_size x grad_accum samples, rank k a contiguous slice of each micro-batch.
    """

    def __init__(self, n: int, batch_size: int, world_size: int, grad_accum: int, seed: int) -> None:
        """Plan batches of `batch_size` samples of `n`, over `world_size` processes and `grad_accum` micro-batches."""
        self.n, self.b, self.w, self.accum, self.seed = n, batch_size, world_size, grad_accum, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over all processes and micro-batches."""
        return self.b * self.w * self.accum

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._perms[epoch][offset])

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The sample indices of each micro-batch that process `rank` runs at optimizer step `step`."""
        start = step * self.global_batch
        return [[self._index(start + m * self.b * self.w + rank * self.b + i) for i in range(self.b)]
                for m in range(self.accum)]
