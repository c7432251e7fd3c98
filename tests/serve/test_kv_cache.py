"""The static KV cache: row moves copy what they should, and the layout moves pack and order any rows."""
from __future__ import annotations

import random

import pytest
import torch

from lorakit.serve.kv_cache import KVCache, layout_moves


def test_move_copies_a_row_in_every_layer():
    cache = KVCache(n_layers=3, max_rows=4, n_kv_heads=2, max_seq_len=8, head_dim=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.move(3, 1, length=5)
    assert torch.equal(cache.k[:, 1, :, :5], before_k[:, 3, :, :5])
    assert torch.equal(cache.v[:, 1, :, :5], before_v[:, 3, :, :5])
    assert torch.equal(cache.k[:, 1, :, 5:], before_k[:, 1, :, 5:])  # beyond the length: untouched
    assert cache.spare == 4 and cache.k.shape[1] == 5


@pytest.mark.parametrize("seed", range(200))
def test_layout_moves_pack_rows_adapters_first(seed):
    rng = random.Random(seed)
    max_rows = rng.randint(1, 8)
    n = rng.randint(0, max_rows)
    slots = rng.sample(range(max_rows), n)
    first = [rng.random() < 0.5 for _ in range(n)]
    occupant = {s: i for i, s in enumerate(slots)}  # slot -> row
    for src, dst in layout_moves(slots, first, spare=max_rows):
        assert dst not in occupant, "a move overwrote a row"
        occupant[dst] = occupant.pop(src)
    n_first = sum(first)
    assert sorted(occupant) == list(range(n))
    assert all(first[row] == (slot < n_first) for slot, row in occupant.items())


def test_rows_already_in_place_do_not_move():
    assert layout_moves([0, 1, 2], [True, True, False], spare=4) == []
    assert layout_moves([0, 3], [True, False], spare=4) == [(3, 1)]
    assert layout_moves([0, 1], [False, True], spare=4) == [(0, 4), (1, 0), (4, 1)]  # a swap, through the spare
