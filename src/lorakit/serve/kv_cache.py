"""A static key/value cache: one preallocated row (slot) per running request, and the moves that keep the
running rows packed.

Keys and values of every layer live in two tensors of shape (layers, slots + 1, kv_heads, max_seq_len,
head_dim), allocated once: decoding writes in place and never reallocates. The running requests occupy
slots 0..n-1, so a decoding step attends over `k[layer, :n]`, a view. The extra last slot is scratch space
for swapping two rows.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of up to `max_rows` requests of up to `max_seq_len` tokens each.

    Args:
        n_layers, n_kv_heads, head_dim: the model's attention shape.
        max_rows: requests held at once.
        max_seq_len: tokens per request (prompt + generated).
        dtype, device: the model's.
    """

    def __init__(self, n_layers: int, max_rows: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_layers, max_rows + 1, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_rows, self.max_seq_len = max_rows, max_seq_len
        self.spare = max_rows  # the scratch slot

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`, in every layer."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])


def layout_moves(slots: list[int], first: list[bool], spare: int) -> list[tuple[int, int]]:
    """The slot moves that pack n rows into slots 0..n-1 with the `first` rows before the others.

    Rows already in their zone stay; each other row takes a free slot of its zone. A cycle of rows that
    must trade places goes through the `spare` slot.

    Args:
        slots: each row's current slot (distinct).
        first: for each row, whether it belongs in the leading zone (rows with an adapter).
        spare: a slot index no row uses, for swaps.

    Returns:
        (src, dst) moves, in an order where every dst is free when its move runs.
    """
    n_first, n = sum(first), len(slots)
    zone = [range(n_first) if f else range(n_first, n) for f in first]
    staying = {s for s, z in zip(slots, zone) if s in z}
    free = {True: [s for s in range(n_first) if s not in staying],
            False: [s for s in range(n_first, n) if s not in staying]}
    target = {s: free[f].pop(0) for s, z, f in zip(slots, zone, first) if s not in z}  # src -> dst
    moves: list[tuple[int, int]] = []
    while target:
        ready = [src for src, dst in target.items() if dst not in target]  # dst holds no row still to move
        if not ready:  # only cycles remain: park one row in the spare slot
            src = next(iter(target))
            moves.append((src, spare))
            target[spare] = target.pop(src)
            continue
        for src in ready:
            moves.append((src, target.pop(src)))
    return moves
