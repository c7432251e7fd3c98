"""The value types a config option may have: what each looks like in words, and converting values to it.

Supported: `bool`, `int`, `float`, `str`, `pathlib.Path`, `Literal[...]`, `list[T]` of those scalars,
`dict` / `dict[str, T]`, and any of these `| None`. Values convert only without loss: text that spells a
number, an int for a float, an integral float for an int, a scalar for a one-item list. The same
conversion serves a YAML config file and command-line text.
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

_SCALARS = (bool, int, float, str, Path)
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def split_optional(annotation: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None` / `Optional[T]`; (annotation, False) otherwise.

    Raises:
        TypeError: for any other union.
    """
    if get_origin(annotation) in (Union, types.UnionType):
        members = get_args(annotation)
        rest = [member for member in members if member is not type(None)]
        if len(rest) == 1 and len(rest) < len(members):
            return rest[0], True
        raise TypeError(f"unsupported field type {annotation!r}: only `T | None` unions are supported.")
    return annotation, False


def list_element(annotation: Any) -> Any | None:
    """The element type of a `list` / `list[T]` annotation (str for a bare `list`); None if not a list."""
    if annotation is list or get_origin(annotation) is list:
        args = get_args(annotation)
        return args[0] if args else str
    return None


def _is_dict(annotation: Any) -> bool:
    return annotation is dict or get_origin(annotation) is dict


def describe_type(annotation: Any) -> str:
    """What a value of `annotation` looks like, in words, e.g. "an integer or null".

    Raises:
        TypeError: for a type a config option cannot have.
    """
    base, optional = split_optional(annotation)
    element = list_element(base)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if base in words:
        text = words[base]
    elif get_origin(base) is Literal:
        choices = get_args(base)
        if not all(isinstance(choice, (str, int, bool)) for choice in choices):
            raise TypeError(f"unsupported Literal {base!r}: choices must be str, int or bool.")
        text = "one of " + ", ".join(map(repr, choices))
    elif element is not None:
        if element not in _SCALARS and get_origin(element) is not Literal:
            raise TypeError(f"unsupported list element type in {base!r}.")
        example = "1,2,4" if element in (int, float) else "a,b"
        text = f"a list of items that are each {describe_type(element)} (a YAML list, or text such as {example})"
    elif _is_dict(base):
        args = get_args(base)
        if args and (args[0] is not str or (args[1] is not Any and args[1] not in _SCALARS)):
            raise TypeError(f"unsupported dict type {base!r}: use dict or dict[str, T] with a scalar T.")
        text = 'a mapping (a YAML mapping, or JSON text such as {"q_proj": 16})'
    else:
        raise TypeError(f"unsupported field type {annotation!r}.")
    return f"{text} or null" if optional else text


class _Mismatch(Exception):
    """A value does not fit a type; `coerce_value` words the error."""


def coerce_value(value: Any, annotation: Any) -> Any:
    """`value` (from YAML, or command-line text) as `annotation`'s type.

    Only lossless conversions: text that spells a number, an int for a float, an integral float for an
    int. YAML 1.1 reads `1e-4` (no dot) as text, so numbers arriving as text are the normal case. A
    string is never made from a number or bool: `quantize: no` in YAML is False, and turning it into
    "False" would hide the mistake.

    Args:
        value: the value read.
        annotation: a type `describe_type` accepts.

    Returns:
        The converted value.

    Raises:
        ValueError: "expected <describe_type(annotation)>, got <value>" if it does not fit.
    """
    try:
        return _coerce(value, annotation)
    except _Mismatch:
        raise ValueError(f"expected {describe_type(annotation)}, got {value!r}") from None


def _coerce(value: Any, annotation: Any) -> Any:
    base, optional = split_optional(annotation)
    if value is None:
        if optional:
            return None
        raise _Mismatch
    element = list_element(base)
    if element is not None:
        if isinstance(value, str):
            items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # `layers: 3` for a list field means [3]
        return [_coerce(item, element) for item in items]
    if _is_dict(base):
        return _to_dict(value, base)
    if get_origin(base) is Literal:
        for choice in get_args(base):
            if type(choice) is type(value) and choice == value:
                return choice
        raise _Mismatch
    return _to_scalar(value, base)


def _to_scalar(value: Any, base: Any) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise _Mismatch
    if base is int:
        return _to_int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _Mismatch
        try:
            return float(value)
        except ValueError:
            raise _Mismatch from None
    if base is str and isinstance(value, str):
        return value
    if base is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise _Mismatch


def _to_int(value: Any) -> int:
    """`value` as an int if it is one, or spells one (8, 8.0, "8", "1e3"); else _Mismatch."""
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Mismatch


def _to_dict(value: Any, base: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Mismatch from None
    if not isinstance(value, dict):
        raise _Mismatch
    args = get_args(base)
    if args and not all(isinstance(key, str) for key in value):
        raise _Mismatch
    if not args or args[1] is Any:
        return dict(value)
    return {key: _coerce(item, args[1]) for key, item in value.items()}
