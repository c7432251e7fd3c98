"""Tests for lorakit.training.data.batching: packing into blocks, collating into padded tensors."""
from __future__ import annotations

import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.training.data.batching import BatchPlan, collate, pack
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


def test_batch_plan_is_a_function_of_the_step():
    plan = BatchPlan(n=10, batch_size=2, world_size=2, grad_accum=2, seed=3)
    assert plan.global_batch == 8
    # the sample stream: micro-batch by micro-batch, each one rank 0's slice then rank 1's
    stream = [i for step in range(5) for pair in zip(plan.micro_batches(step, 0), plan.micro_batches(step, 1))
              for m in pair for i in m]
    # one epoch is a permutation of the samples, then the next epoch's, and so on
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))
    # a fresh plan (a resumed run) gives step 3 the same batches as the plan that ran steps 0-2
    again = BatchPlan(n=10, batch_size=2, world_size=2, grad_accum=2, seed=3)
    assert [again.micro_batches(3, rank) for rank in (0, 1)] == [plan.micro_batches(3, rank) for rank in (0, 1)]
    # the two processes split each micro-batch, and one process alone with twice the batch sees the same samples
    single = BatchPlan(n=10, batch_size=4, world_size=1, grad_accum=2, seed=3)
    for step in range(5):
        assert [sorted(a + b) for a, b in zip(plan.micro_batches(step, 0), plan.micro_batches(step, 1))] == \
            [sorted(m) for m in single.micro_batches(step, 0)]
