"""One way to read a JSON value out of a data file (a JSONL line, a CSV cell, a tool call's arguments), with
lorakit's error naming where it was and what to write instead."""
from __future__ import annotations

import json
from typing import Any

from lorakit.core.errors import LorakitError

_KIND_NAMES = {dict: "object", list: "list"}


def json_value(value: Any, where: str, kind: type, fix: str) -> Any:
    """`value` parsed from JSON when it is a string (else taken as it is), checked to be a `kind`.

    Args:
        value: A JSON text, or an already decoded value (datasets and JSONL rows hand over decoded cells).
        where: Where the value came from, e.g. ``data.jsonl:3`` or ``data.csv:2: 'messages'``.
        kind: ``dict`` or ``list``.
        fix: What the user should write instead, ending the message.

    Raises:
        LorakitError: The text is not valid JSON, or the value is not a `kind`.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
            raise LorakitError(f"{where}: invalid JSON ({getattr(e, 'msg', 'nested too deeply')}); {fix}") from None
    if not isinstance(value, kind):
        raise LorakitError(f"{where}: expected a JSON {_KIND_NAMES.get(kind, kind.__name__)}, "
                           f"got {type(value).__name__}; {fix}")
    return value
