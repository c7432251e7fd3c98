"""`--streaming`: train on data larger than RAM with bounded memory.

Rows are read lazily through `datasets` IterableDatasets (`sources`), validated as they
come (a bad row stops the run when it is reached, naming file:row), shuffled within a bounded buffer
(a seeded reservoir of `--shuffle-buffer` rows, reseeded each pass), tokenized one at a time and, with
`--packing`, packed into `--max-seq-len` blocks exactly as `pack` does. Nothing holds more than the buffer,
one global batch and one partial block, whatever the size of the data.

    stream = RowStream(parts, options, format, seed=0, shuffle_buffer=1000, skip=100)   # rows 1-100 held out
    batches = StreamBatches(stream.records, tokenize, pack_len=512, batch_size=8, world_size=1, grad_accum=1)
    batches.micro_batches(step=0, rank=0)    # [[example, ...]]: the same contract as BatchPlan's indices

Step s always gets the s-th global batch of the stream (the sequence restarts, reshuffled, at the end of each
pass), so a resumed run reads up to its checkpoint's step and continues with the batches an uninterrupted run
would have seen.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

from lorakit.core.errors import LorakitError
from lorakit.training.data.records import detect_format, record_format
from lorakit.training.data.sources import DataOptions, Part, iter_rows, validate_row
from lorakit.training.loss import IGNORE_INDEX


class RowStream:
    """Validated records of the parts, pass after pass, each pass shuffled in a bounded buffer.

    Args:
        parts: the sources (`resolve`).
        options: split, columns, max_samples.
        format: the data format; None: detected from the first row (`peek`).
        seed: the shuffle seed; pass p uses seed + p.
        shuffle_buffer: rows held for shuffling (0 or 1: read in order).
        skip: leading rows left out (held out for evaluation).
    """

    def __init__(self, parts: list[Part], options: DataOptions, format: str | None, seed: int,
                 shuffle_buffer: int, skip: int = 0) -> None:
        self.parts, self.options, self.seed, self.buffer, self.skip = parts, options, seed, shuffle_buffer, skip
        self.raw_format = format or self.peek_format()

    @property
    def format(self) -> str:
        """The format of the records this stream yields (ShareGPT rows come out as chat records)."""
        return record_format(self.raw_format)

    def peek_format(self) -> str:
        for where, row in iter_rows(self.parts, self.options):
            return detect_format(row, where)
        raise LorakitError(f"{self.parts[0].label}: the data holds no rows; add at least one.")

    def head(self, n: int) -> list[dict]:
        """The first `n` validated records in reading order (the held-out ones when `skip` = n)."""
        rows = iter_rows(self.parts, self.options, self.raw_format)
        return [self.validate(where, row) for (where, row), _ in zip(rows, range(n))]

    def validate(self, where: str, row: dict) -> dict:
        return validate_row(where, row, self.raw_format)

    def records(self, epoch: int) -> Iterator[dict]:
        """One pass over the records, shuffled with seed + epoch."""
        rows = iter_rows(self.parts, self.options, self.raw_format)
        ordered = (self.validate(where, row) for i, (where, row) in enumerate(rows) if i >= self.skip)
        return shuffled(ordered, self.buffer, random.Random(self.seed + epoch))


def shuffled(items: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """`items` in a random order drawn from a buffer of `buffer_size` (the usual streaming shuffle)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class StreamBatches:
    """Training micro-batches read from a record stream, in order, without ever holding the data.

    Args:
        records: epoch -> an iterator over that pass's records.
        tokenize: a list of records -> their training examples ({"input_ids", "labels"}).
        pack_len: pack examples into blocks of this many tokens; None: one example per sample.
        batch_size, world_size, grad_accum: as for `BatchPlan`.
    """

    def __init__(self, records: Callable[[int], Iterator[dict]], tokenize: Callable[[list[dict]], list[dict]],
                 pack_len: int | None, batch_size: int, world_size: int, grad_accum: int) -> None:
        self.records, self.tokenize, self.pack_len = records, tokenize, pack_len
        self.b, self.w, self.accum = batch_size, world_size, grad_accum
        self.examples = self.endless()
        self.next_step = 0

    @property
    def global_batch(self) -> int:
        return self.b * self.w * self.accum

    def endless(self) -> Iterator[dict]:
        """Examples of pass 0, then pass 1, ...; packed blocks run on across passes."""
        epoch = 0
        ids: list[int] = []
        labels: list[int] = []
        while True:
            produced = False
            for record in self.records(epoch):
                for example in self.tokenize([record]):
                    if self.pack_len is None:
                        produced = True
                        yield example
                        continue
                    ids += example["input_ids"]
                    labels += example["labels"]
                    while len(ids) >= self.pack_len:
                        block = {"input_ids": ids[:self.pack_len], "labels": labels[:self.pack_len]}
                        del ids[:self.pack_len], labels[:self.pack_len]
                        if any(label != IGNORE_INDEX for label in block["labels"]):
                            produced = True
                            yield block
            if not produced:
                raise LorakitError("the streamed data yields no training sample in a whole pass (too little data "
                                   "for one --max-seq-len block?); add data or lower --max-seq-len.")
            epoch += 1

    def take(self) -> list[dict]:
        return [next(self.examples) for _ in range(self.global_batch)]

    def micro_batches(self, step: int, rank: int) -> list[list[dict]]:
        """Rank `rank`'s examples of each micro-batch of optimizer step `step` (steps come in order; a first
        call with step > 0, on resume, reads past the earlier steps' batches).

        Raises:
            LorakitError: `step` is earlier than a step already read.
        """
        if step < self.next_step:
            raise LorakitError(f"the stream is past step {step}; streamed batches can only be read in order.")
        while self.next_step < step:
            self.take()
            self.next_step += 1
        batch = self.take()
        self.next_step = step + 1
        return [[batch[m * self.b * self.w + rank * self.b + i] for i in range(self.b)] for m in range(self.accum)]


def open_stream(cfg, tokenizer, world_size: int = 1) -> tuple[str, StreamBatches, list[dict], list[dict]]:
    """A `--streaming` run's data: (format, training batches, tokenized held-out examples, held-out records);
    with `world_size` processes, each reads the whole stream and takes its own slice of every batch.

    The held-out set is --eval-data (read into memory), else the first max(1, --eval-samples) rows of --data,
    which the training stream then skips.

    Raises:
        LorakitError: as `resolve` / `iter_rows`, or the data holds no rows.
    """
    from lorakit.training.data.sources import read_held_out, resolve, run_options
    from lorakit.training.data.tokenize import tokenize_records

    n_held = 0 if cfg.eval_data else max(1, cfg.eval_samples)
    stream = RowStream(resolve(cfg.data, cfg.split), run_options(cfg), None if cfg.format == "auto" else cfg.format,
                       cfg.seed, cfg.shuffle_buffer, skip=n_held)
    held = read_held_out(cfg, stream.format) if cfg.eval_data else stream.head(n_held)
    tok = dict(tokenizer=tokenizer, format=stream.format, max_seq_len=cfg.max_seq_len, truncate=cfg.truncate,
               train_on_prompt=cfg.train_on_prompt)
    batches = StreamBatches(stream.records, lambda records: tokenize_records(records, **tok),
                            cfg.max_seq_len if cfg.packing else None, cfg.batch_size, world_size, cfg.grad_accum)
    return stream.format, batches, tokenize_records(held, **tok), held
