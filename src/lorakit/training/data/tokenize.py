"""Tokenizing records into training examples: ``input_ids`` with ``labels`` masked to the trained tokens."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorakit.core.errors import LorakitError
from lorakit.training.data.records import FORMATS, record_location
from lorakit.training.data.render import bos_text, render_segments
from lorakit.training.loss import IGNORE_INDEX

log = logging.getLogger(__name__)


def tokenize_records(
    records: list[dict],
    tokenizer: Any,
    format: str,
    max_seq_len: int,
    truncate: bool = False,
    train_on_prompt: bool = False,
    source: str | Path | None = None,
) -> list[dict]:
    """Tokenize records into training examples with masked labels.

    Text documents get EOS appended (BOS prepended when the tokenizer adds one) and are cut
    into consecutive chunks of at most ``max_seq_len`` tokens; every token is trained.
    Instruction/chat records are rendered (see ``render.render_segments``), each piece tokenized with
    ``add_special_tokens=False`` and concatenated; labels are ``IGNORE_INDEX`` on prompt, system and
    user tokens unless ``train_on_prompt``.

    Args:
        records: records from ``load_records`` (or any with the same fields; ``_line`` optional).
        tokenizer: a Hugging Face tokenizer.
        format: ``"text"``, ``"instruction"`` or ``"chat"``.
        max_seq_len: the longest example, in tokens.
        truncate: cut instruction/chat samples longer than ``max_seq_len`` at the end instead
            of raising. Samples left with no trained token are dropped (with a warning).
        train_on_prompt: train on prompt tokens too, not only on responses.
        source: the data file, named in errors together with each record's ``_line``.

    Returns:
        A list of ``{"input_ids": list[int], "labels": list[int]}`` of equal lengths.

    Raises:
        LorakitError: unknown format, ``max_seq_len < 2``, an instruction/chat sample longer
            than ``max_seq_len`` without ``truncate`` (naming ``file:line``), or a chat
            template whose turns cannot be located.
    """
    if format not in FORMATS:
        raise LorakitError(f"Unknown data format {format!r}; use one of {', '.join(FORMATS)}.")
    if max_seq_len < 2:
        raise LorakitError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}; raise --max-seq-len.")
    if format == "text":
        return _tokenize_text(records, tokenizer, max_seq_len)

    examples, dropped = [], 0
    for index, record in enumerate(records):
        try:
            segments = render_segments(record, format, tokenizer)
        except LorakitError as e:
            raise LorakitError(f"{record_location(record, index, source)}: {e}") from None
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if trained or train_on_prompt else [IGNORE_INDEX] * len(ids)
        if len(input_ids) > max_seq_len:
            if not truncate:
                raise LorakitError(
                    f"{record_location(record, index, source)}: the sample is {len(input_ids)} tokens, longer than "
                    f"max_seq_len={max_seq_len}; raise --max-seq-len or pass --truncate to cut long samples."
                )
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1
                continue
        examples.append({"input_ids": input_ids, "labels": labels})
    if dropped:
        log.warning(
            "dropped %d samples whose response lies entirely past max_seq_len=%d", dropped, max_seq_len
        )
    return examples


def _tokenize_text(records: list[dict], tokenizer: Any, max_seq_len: int) -> list[dict]:
    """Tokenize text documents and cut them into consecutive chunks of at most max_seq_len."""
    prefix, eos = bos_text(tokenizer), tokenizer.eos_token or ""
    examples = []
    for record in records:
        ids = tokenizer(prefix + record["text"] + eos, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_seq_len):
            chunk = ids[start : start + max_seq_len]
            # A 1-token chunk predicts nothing (labels shift by one inside the model).
            if len(chunk) > 1:
                examples.append({"input_ids": chunk, "labels": list(chunk)})
    return examples
