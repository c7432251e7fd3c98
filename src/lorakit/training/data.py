"""Training data: read, validate, render, tokenize, mask, pack and collate.

Three formats:

- ``text``: causal LM on the field ``text`` (a ``.txt`` file is split into documents on
  blank lines); every token is trained.
- ``instruction``: Alpaca-style ``instruction``, optional ``input``, ``output``; only the
  response is trained by default.
- ``chat``: ``messages``, a list of ``{"role", "content"}`` with roles system/user/assistant
  and at least one assistant message; every assistant turn is trained.

Records are rendered to text with the tokenizer's chat template when it has one, else with
an Alpaca-style fallback. All rendered text is meant to be tokenized with
``add_special_tokens=False``: the template (or the fallback) already wrote any BOS/EOS.

Loaded records carry their 1-based source line in the private key ``_line`` so that later
errors (e.g. a sample longer than ``--max-seq-len``) can name ``file:line``.
"""
from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lorakit.core.errors import LorakitError

if TYPE_CHECKING:
    import torch

FORMATS = ("text", "instruction", "chat")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip
_EXTENSIONS = (".jsonl", ".csv", ".txt")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading


def load_records(path: str | Path, format: str | None = None) -> tuple[list[dict], str]:
    """Read and validate a training file.

    Args:
        path: a ``.jsonl`` (one object per line, blank lines allowed), ``.csv`` (header row)
            or ``.txt`` (documents separated by blank lines) file.
        format: ``"text"``, ``"instruction"`` or ``"chat"``; None detects it from the first
            record's keys (``messages`` -> chat, ``instruction`` -> instruction,
            ``text`` -> text). A ``.txt`` file is always ``text``.

    Returns:
        ``(records, format)``. Records are normalized dicts: ``{"text"}``,
        ``{"instruction", "input", "output"}`` (input defaults to ``""``) or ``{"messages"}``,
        each with its 1-based source line in ``"_line"``.

    Raises:
        LorakitError: the file is missing, empty or has an unsupported extension, the format
            is unknown or undetectable, or a row is malformed (bad JSON, missing field, wrong
            type, empty response, unknown role); the message names ``file:line``.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise LorakitError(f"Unknown data format {format!r}; use one of {', '.join(FORMATS)}.")
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise LorakitError(
            f"{path}: unsupported file extension {path.suffix!r}; "
            f"training data must be {', '.join(_EXTENSIONS)}."
        )
    if not path.is_file():
        raise LorakitError(f"{path}: data file not found; check the path.")
    text = path.read_text(encoding="utf-8-sig")  # utf-8-sig drops a BOM left by spreadsheet exports

    if suffix == ".txt":
        if format not in (None, "text"):
            raise LorakitError(
                f"{path}: a .txt file holds plain text, so its format is 'text', not {format!r}; "
                "use .jsonl or .csv for instruction or chat data."
            )
        rows: Iterator[tuple[int, dict]] = _txt_rows(text)
        format = "text"
    elif suffix == ".jsonl":
        rows = _jsonl_rows(text, path)
    else:
        rows = _csv_rows(text, path)

    records = []
    for line, row in rows:
        if format is None:
            format = _detect_format(row, f"{path}:{line}")
        records.append({**_validate(row, format, f"{path}:{line}"), "_line": line})
    if not records:
        raise LorakitError(f"{path}: the file holds no records; add at least one.")
    assert format is not None  # set by the first record
    return records, format


def _txt_rows(text: str) -> Iterator[tuple[int, dict]]:
    """Yield (first line, {"text": paragraph}) for each blank-line-separated document."""
    start, lines = 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            yield start, {"text": "\n".join(lines)}
            lines = []
    if lines:
        yield start, {"text": "\n".join(lines)}


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line, object) for each non-blank JSONL line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorakitError(
                f"{path}:{number}: invalid JSON ({e.msg}); each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise LorakitError(
                f"{path}:{number}: expected a JSON object, got {type(row).__name__}; "
                'write one object per line, e.g. {"text": "..."}.'
            )
        yield number, row


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (first line, row dict) for each CSV row; a ``messages`` cell is parsed as JSON."""
    lines = text.splitlines(keepends=True)
    reader = csv.DictReader(lines)
    if not reader.fieldnames:
        raise LorakitError(f"{path}:1: the CSV file has no header row; the first row must name the columns.")
    end = reader.line_num  # physical line where the previous record ended (quoted cells may span lines)
    for row in reader:
        start, end = end + 1, reader.line_num
        while not lines[start - 1].strip():  # the reader skips blank lines silently
            start += 1
        if None in row:  # DictReader puts surplus cells under the key None
            raise LorakitError(
                f"{path}:{start}: the row has more cells than the header has columns; "
                "quote cells that contain commas."
            )
        row = {k: v for k, v in row.items() if v is not None}  # missing trailing cells -> missing fields
        if not any(v.strip() for v in row.values()):
            continue
        if isinstance(row.get("messages"), str):
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as e:
                raise LorakitError(
                    f"{path}:{start}: the 'messages' cell is not valid JSON ({e.msg}); "
                    'it must hold a JSON list like [{"role": "user", "content": "..."}].'
                ) from None
        yield start, row


def _detect_format(row: dict, where: str) -> str:
    """Guess the format from the first record's keys."""
    for key, format in (("messages", "chat"), ("instruction", "instruction"), ("text", "text")):
        if key in row:
            return format
    raise LorakitError(
        f"{where}: cannot detect the data format from the fields {sorted(row)}; records need "
        "'text' (text), 'instruction' and 'output' (instruction) or 'messages' (chat), "
        "or pass the format explicitly."
    )


def _string_field(row: dict, key: str, where: str, *, required: bool = True, nonempty: bool = False) -> str:
    """Return ``row[key]`` checked to be a string (``""`` when optional and missing/null)."""
    value = row.get(key)
    if value is None:
        if required:
            raise LorakitError(f"{where}: missing field {key!r}; every record in this format needs it.")
        return ""
    if not isinstance(value, str):
        raise LorakitError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    if nonempty and not value.strip():
        raise LorakitError(f"{where}: field {key!r} is empty; give it some text or remove the record.")
    return value


def _validate(row: dict, format: str, where: str) -> dict:
    """Check one raw record against ``format`` and return its normalized form (no ``_line``)."""
    if format == "text":
        return {"text": _string_field(row, "text", where, nonempty=True)}
    if format == "instruction":
        return {
            "instruction": _string_field(row, "instruction", where, nonempty=True),
            "input": _string_field(row, "input", where, required=False),
            "output": _string_field(row, "output", where, nonempty=True),
        }
    messages = row.get("messages")
    if messages is None:
        raise LorakitError(
            f"{where}: missing field 'messages'; chat records need a list of {{role, content}}."
        )
    if not isinstance(messages, list) or not messages:
        raise LorakitError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    clean = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise LorakitError(
                f"{at} must be an object with 'role' and 'content', got {type(message).__name__}."
            )
        role = message.get("role")
        if role not in ROLES:
            raise LorakitError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}.")
        content = _string_field(message, "content", at, nonempty=role == "assistant")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise LorakitError(
            f"{where}: the conversation has no assistant message, so there is nothing to train on; add one."
        )
    return {"messages": clean}


# --------------------------------------------------------------------------- rendering


def _messages(record: dict, format: str) -> list[dict]:
    """The conversation of an instruction or chat record, ending at its last assistant turn.

    Turns after the last assistant message carry no trained tokens, so they are dropped.
    """
    if format == "instruction":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[: last + 1]


def _bos_text(tokenizer: Any) -> str:
    """The BOS token as text when the tokenizer adds one by default (Llama-style), else ``""``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if bos is not None and ids and ids[0] == bos else ""


def _segments(record: dict, format: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a rendered instruction/chat record into ``(text, trained)`` pieces.

    With a chat template, the response of assistant turn i is
    ``full[len(prompt):]`` where prompt renders ``messages[:i]`` with the generation prompt
    and full renders ``messages[:i+1]``; it includes the template's end-of-turn marker so
    the model learns to stop. Without one, an Alpaca-style template is used.

    Raises:
        LorakitError: the chat template rejects the conversation, or renders earlier turns
            differently once later turns follow, so response tokens cannot be located.
    """
    from jinja2 import (
        TemplateError,  # chat templates are Jinja; transformers depends on it
    )

    messages = _messages(record, format)
    if not getattr(tokenizer, "chat_template", None):
        return _fallback_segments(record, format, messages, tokenizer)
    segments: list[tuple[str, bool]] = []
    done = ""  # text rendered so far; every later rendering must extend it
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        except TemplateError as e:
            raise LorakitError(
                f"the model's chat template rejects this conversation ({e}); "
                "reorder its messages as the template expects (often: optional system, then "
                "alternating user/assistant starting with user)."
            ) from None
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LorakitError(
                f"the model's chat template renders turn {i} differently once later turns follow, "
                "so the response tokens cannot be located; split the conversation into one record "
                "per assistant turn."
            )
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, trained) for text, trained in segments if text]


def _fallback_segments(
    record: dict, format: str, messages: list[dict], tokenizer: Any
) -> list[tuple[str, bool]]:
    """Alpaca-style rendering for tokenizers without a chat template.

    ``### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n`` then the response
    and EOS. Chat system turns become a leading paragraph, user turns become instructions.
    """
    eos = tokenizer.eos_token or ""
    if format == "instruction":
        prompt = f"### Instruction:\n{record['instruction']}\n\n"
        if record.get("input"):
            prompt += f"### Input:\n{record['input']}\n\n"
        return [(_bos_text(tokenizer) + prompt + "### Response:\n", False), (record["output"] + eos, True)]
    segments: list[tuple[str, bool]] = []
    pending = _bos_text(tokenizer)  # untrained text waiting for the next assistant turn
    for message in messages:
        if message["role"] == "system":
            pending += f"{message['content']}\n\n"
        elif message["role"] == "user":
            pending += f"### Instruction:\n{message['content']}\n\n"
        else:
            segments += [(pending + "### Response:\n", False), (message["content"] + eos, True)]
            pending = "\n\n"
    return segments


# --------------------------------------------------------------------------- tokenizing


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
    Instruction/chat records are rendered (see ``_segments``), each piece tokenized with
    ``add_special_tokens=False`` and concatenated; labels are ``-100`` on prompt, system and
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
            segments = _segments(record, format, tokenizer)
        except LorakitError as e:
            raise LorakitError(f"{_where(record, index, source)}: {e}") from None
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if trained or train_on_prompt else [IGNORE_INDEX] * len(ids)
        if len(input_ids) > max_seq_len:
            if not truncate:
                raise LorakitError(
                    f"{_where(record, index, source)}: the sample is {len(input_ids)} tokens, longer than "
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
    prefix, eos = _bos_text(tokenizer), tokenizer.eos_token or ""
    examples = []
    for record in records:
        ids = tokenizer(prefix + record["text"] + eos, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_seq_len):
            chunk = ids[start : start + max_seq_len]
            # A 1-token chunk predicts nothing (labels shift by one inside the model).
            if len(chunk) > 1:
                examples.append({"input_ids": chunk, "labels": list(chunk)})
    return examples


def _where(record: dict, index: int, source: str | Path | None) -> str:
    """``file:line`` for a record when known, else its line or 1-based position."""
    if "_line" in record:
        return f"{source}:{record['_line']}" if source is not None else f"line {record['_line']}"
    return f"{source}: record {index + 1}" if source is not None else f"record {index + 1}"


# --------------------------------------------------------------------------- batching


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
        (1 on real tokens, 0 on pads) and ``labels`` (``-100`` on pads).

    Raises:
        LorakitError: the batch is empty.
    """
    import torch

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


# --------------------------------------------------------------------------- evaluation


def split_heldout(
    records: list[dict], fraction: float = 0.1, seed: int = 0, min_eval: int = 1
) -> tuple[list[dict], list[dict]]:
    """Deterministically hold out a fraction of records for evaluation.

    Args:
        records: the records to split.
        fraction: share of records held out, in ``[0, 1)``.
        seed: shuffling seed; the same records and seed always give the same split.
        min_eval: hold out at least this many records.

    Returns:
        ``(train, eval)``, each in the original record order.

    Raises:
        LorakitError: ``fraction`` outside ``[0, 1)``, or too few records to leave at least
            one for training after holding out ``min_eval``.
    """
    if not 0 <= fraction < 1:
        raise LorakitError(f"The held-out fraction must be in [0, 1), got {fraction}.")
    n_eval = max(min_eval, round(len(records) * fraction))
    if n_eval >= len(records):
        raise LorakitError(
            f"Cannot hold out {n_eval} of {len(records)} records and still train; "
            "add more data or lower the held-out fraction."
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evaluation = [r for i, r in enumerate(records) if i in held]
    return train, evaluation


def prompts_and_references(records: list[dict], tokenizer: Any, format: str) -> list[tuple[str, str]]:
    """Generation prompts and reference responses for exact-match evaluation.

    Args:
        records: instruction or chat records.
        tokenizer: the tokenizer whose chat template (or the fallback) renders prompts.
        format: ``"instruction"`` or ``"chat"``.

    Returns:
        ``(prompt, reference)`` pairs: the rendered text up to and including the generation
        prompt of the last assistant turn (tokenize it with ``add_special_tokens=False``),
        and that turn's content (the ``output`` for instruction records).

    Raises:
        LorakitError: ``format`` is not instruction or chat.
    """
    if format not in ("instruction", "chat"):
        raise LorakitError(
            f"Exact-match evaluation needs instruction or chat data, not {format!r}; "
            "text data has no reference responses."
        )
    pairs = []
    for index, record in enumerate(records):
        try:
            segments = _segments(record, format, tokenizer)
        except LorakitError as e:
            raise LorakitError(f"{_where(record, index, None)}: {e}") from None
        # The last segment is the final response; everything before it is its prompt.
        prompt = "".join(text for text, _ in segments[:-1])
        pairs.append((prompt, _messages(record, format)[-1]["content"]))
    return pairs


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` equals ``reference`` after stripping surrounding whitespace.

    Args:
        prediction: generated text.
        reference: expected text.

    Returns:
        True when both are equal once stripped.
    """
    return prediction.strip() == reference.strip()
