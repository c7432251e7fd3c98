"""Reading training data: load and validate a file's records, and hold some out for evaluation.

Four formats:

- ``text``: causal LM on the field ``text`` (a ``.txt`` file is split into documents on
  blank lines); every token is trained.
- ``instruction``: Alpaca-style ``instruction``, optional ``input``, ``output``; only the
  response is trained by default.
- ``chat``: OpenAI ``messages``, a list of ``{"role", "content"}`` with roles
  system/user/assistant/tool, assistant tool calls and a ``tools`` list (`conversation`), and at
  least one assistant message; every assistant turn is trained.
- ``sharegpt``: ``conversations``, a list of ``{"from", "value"}``; read into chat records.

Loaded records carry their 1-based source line in the private key ``_line`` so that later
errors (e.g. a sample longer than ``--max-seq-len``) can name ``file:line`` (``record_location``).
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Iterator

from lorakit.core.errors import LorakitError
from lorakit.training.data.conversation import chat_record, sharegpt_record
from lorakit.training.data.json_values import json_value

ONE_OBJECT_PER_LINE = 'write one JSON object per line, e.g. {"text": "..."}.'

FORMATS = ("text", "instruction", "chat", "sharegpt")
_EXTENSIONS = (".jsonl", ".csv", ".txt")


def load_records(path: str | Path, format: str | None = None) -> tuple[list[dict], str]:
    """Read and validate a training file.

    Args:
        path: a ``.jsonl`` (one object per line, blank lines allowed), ``.csv`` (header row)
            or ``.txt`` (documents separated by blank lines) file.
        format: ``"text"``, ``"instruction"``, ``"chat"`` or ``"sharegpt"``; None detects it from the
            first record's keys (see `detect_format`). A ``.txt`` file is always ``text``.

    Returns:
        ``(records, format)``. Records are normalized dicts: ``{"text"}``,
        ``{"instruction", "input", "output"}`` (input defaults to ``""``) or ``{"messages"[, "tools"]}``,
        each with its 1-based source line in ``"_line"``; ShareGPT records come back as chat records,
        with format ``"chat"``.

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
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig drops a BOM left by spreadsheet exports
    except UnicodeDecodeError as e:
        raise LorakitError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); save the file as UTF-8.") from None

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
            format = detect_format(row, f"{path}:{line}")
        records.append({**validate_record(row, format, f"{path}:{line}"), "_line": line})
    if not records:
        raise LorakitError(f"{path}: the file holds no records; add at least one.")
    assert format is not None  # set by the first record
    return records, record_format(format)


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
        row = json_value(line, f"{path}:{number}", dict, ONE_OBJECT_PER_LINE)
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
            row["messages"] = json_value(row["messages"], f"{path}:{start}: the 'messages' cell", list,
                                         'it must hold a JSON list like [{"role": "user", "content": "..."}].')
        yield start, row


def detect_format(row: dict, where: str) -> str:
    """The format of a record from its keys: messages -> chat, conversations -> sharegpt,
    instruction -> instruction, text -> text (the first that it has).

    Raises:
        LorakitError: the record has none of them; the message names `where`.
    """
    for key, format in (("messages", "chat"), ("conversations", "sharegpt"), ("instruction", "instruction"),
                        ("text", "text")):
        if row.get(key) is not None:
            return format
    raise LorakitError(
        f"{where}: cannot detect the data format from the fields {sorted(row)}; records need "
        "'text' (text), 'instruction' and 'output' (instruction), 'messages' (chat) or "
        "'conversations' (sharegpt), or pass the format explicitly."
    )


def record_format(format: str) -> str:
    """The format of validated records: ShareGPT records are validated into chat records."""
    return "chat" if format == "sharegpt" else format


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


def validate_record(row: dict, format: str, where: str) -> dict:
    """Check one raw record against ``format`` and return its normalized form (no ``_line``).

    Raises:
        LorakitError: a field is missing, of the wrong type or empty, or a conversation is malformed; the
            message starts with `where` (``file:line``).
    """
    if format == "text":
        return {"text": _string_field(row, "text", where, nonempty=True)}
    if format == "instruction":
        return {
            "instruction": _string_field(row, "instruction", where, nonempty=True),
            "input": _string_field(row, "input", where, required=False),
            "output": _string_field(row, "output", where, nonempty=True),
        }
    return sharegpt_record(row, where) if format == "sharegpt" else chat_record(row, where)


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


def record_location(record: dict, index: int, source: str | Path | None) -> str:
    """Where a record came from, for error messages.

    Args:
        record: a record, with its source line in ``"_line"`` when it was loaded from a file, or its own
            ``"_at"`` (``file:row N``) when it was read through `datasets` (`sources`).
        index: its 0-based position in its list.
        source: the data file, or None when unknown.

    Returns:
        ``_at``; else ``file:line`` when both are known, else its line or its 1-based position.
    """
    if "_at" in record:
        return record["_at"]
    if "_line" in record:
        return f"{source}:{record['_line']}" if source is not None else f"line {record['_line']}"
    return f"{source}: record {index + 1}" if source is not None else f"record {index + 1}"
