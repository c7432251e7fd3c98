"""Tests for lorakit.training.data.batching: packing into blocks, collating into padded tensors."""
from __future__ import annotations

import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.training.data.batching import collate, pack
from lorakit.training.loss import IGNORE_INDEX


def _example(n: int, start: int = 0, masked: int = 0) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]}


def test_pack_lengths_and_labels():
    examples = [_example(5, 0, masked=2), _example(7, 100, masked=3), _example(4, 200)]
    blocks = pack(examples, 6)
    assert [len(b["input_ids"]) for b in blocks] == [6, 6, 4]
    assert [t for b in blocks for t in b["input_ids"]] == [t for e in examples for t in e["input_ids"]]
    assert [t for b in blocks for t in b["labels"]] == [t for e in examples for t in e["labels"]]


def test_pack_skips_blocks_without_loss():
    blocks = pack([_example(4, masked=4), _example(5, 10)], 4)
    assert [b["input_ids"] for b in blocks] == [[10, 11, 12, 13]]  # the masked block and 1-token tail go
    with pytest.raises(LorakitError):
        pack([_example(4)], 1)


def test_collate_pads_right():
    batch = collate([_example(3, 1, masked=1), _example(5, 10)], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1] * 5
    with pytest.raises(LorakitError):
        collate([], pad_id=0)
