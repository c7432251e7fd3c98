"""The dataclass is the CLI: build an argparse parser, and read YAML configs, from a config dataclass.

Each field becomes one flag (`lora_alpha` -> `--lora-alpha`) whose help is the docstring written under
the field. A value is resolved in this order, last one wins: the dataclass default, the `--config`
YAML file, the flags given on the command line. Supported field types: `bool`, `int`, `float`, `str`,
`pathlib.Path`, `Literal[...]`, `list[T]` of those scalars, `dict` / `dict[str, T]`, and any of these
`| None`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_write_text

_SCALARS = (bool, int, float, str, Path)
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}
# Default of a positional argument the user left out. Not argparse.SUPPRESS: argparse runs a string
# default of an omitted positional through `type` and `choices`, which would reject "==SUPPRESS==".
_UNSET = object()


class _Mismatch(Exception):
    """A value does not fit a field's type; the caller words the error for its source (YAML or flag)."""


# ---------------------------------------------------------------------------------------------- help


def field_help(cls: type) -> dict[str, str]:
    """The help text of each field of a config dataclass.

    The text is the docstring written under the field (base dataclasses included; a subclass's own
    docstring wins), else `field(metadata={"help": ...})`, else "".

    Args:
        cls: a dataclass type.

    Returns:
        {field name: help text}, in field order.

    Raises:
        TypeError: if `cls` is not a dataclass type.
    """
    _require_dataclass_type(cls)
    docs: dict[str, str] = {}
    # Base classes first, so that a subclass that documents a field again overrides the base's text.
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_attribute_docstrings(klass))
    return {f.name: docs.get(f.name) or str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def _attribute_docstrings(klass: type) -> dict[str, str]:
    """{name: docstring} for `name: T = ...` statements directly followed by a string literal."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        # No source (a class built at runtime, a frozen app): help falls back to field metadata.
        return {}
    class_def = next((node for node in tree.body if isinstance(node, ast.ClassDef)), None)
    if class_def is None:
        return {}
    docs: dict[str, str] = {}
    for stmt, following in zip(class_def.body, class_def.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


# ------------------------------------------------------------------------------------------- parser


def build_parser(
    cls: type,
    prog: str,
    description: str | None = None,
    positional: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """An argparse parser with one argument per field of a config dataclass, plus `--config FILE.yaml`.

    Flags the user did not give are absent from the parsed namespace (no argparse defaults), so that
    `parse_config` can tell them from values that should override the YAML file. For the same reason
    positional arguments are optional here (`nargs="?"`): a required one may come from the YAML file,
    and `parse_config` reports it missing only when it is in neither.

    Args:
        cls: the config dataclass.
        prog: program name shown in usage, e.g. "lorakit train".
        description: text shown above the arguments in `--help`.
        positional: fields taken as positional arguments instead of flags, e.g. ("adapter_dir",).

    Returns:
        The parser.

    Raises:
        TypeError: if `cls` is not a dataclass, has a field named "config", has a field of an
            unsupported type, or `positional` names a field it lacks or a bool field.
    """
    fields = _init_fields(cls)
    names = {f.name for f in fields}
    if "config" in names:
        raise TypeError(f"{cls.__name__} has a field named 'config', which clashes with the --config flag.")
    for name in positional:
        if name not in names:
            raise TypeError(f"positional={positional!r}: {cls.__name__} has no field {name!r}.")
    hints = _type_hints(cls)
    helps = field_help(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Abbreviated flags would silently change meaning when a new field shares the prefix.
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=argparse.SUPPRESS,
        help="YAML file of option values (keys are the field names, e.g. lora_alpha); "
        "flags given on the command line override it.",
    )
    for f in fields:
        annotation = hints[f.name]
        base, _ = _split_optional(annotation)
        _describe(annotation)  # fails now, not at parse time, for an unsupported field type
        help_text = _help_line(helps[f.name], f)
        if f.name in positional:
            if base is bool:
                raise TypeError(f"positional field {f.name!r} is a bool; bools are --flag/--no-flag options.")
            parser.add_argument(
                f.name, nargs="?", default=_UNSET, help=help_text, metavar=f.name.upper(), **_value_options(annotation)
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=_metavar(base),
                **_value_options(annotation),
            )
    return parser


def _value_options(annotation: Any) -> dict[str, Any]:
    """argparse `type` (and `choices` for a Literal) that turn command-line text into the field's type."""
    base, _ = _split_optional(annotation)
    if get_origin(base) is Literal:
        choices = get_args(base)
        by_text = {str(choice): choice for choice in choices}

        def to_choice(text: str) -> Any:
            # Unknown text passes through unchanged so that argparse's `choices` check words the error.
            return by_text.get(text, text)

        return {"type": to_choice, "choices": choices}
    expected = _describe(base)

    def convert(text: str) -> Any:
        try:
            return _coerce(text, base)
        except _Mismatch:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return {"type": convert}


def _metavar(base: Any) -> str | None:
    """The placeholder shown in usage, e.g. `--r N`; None lets argparse show a Literal's choices."""
    origin = get_origin(base)
    if origin is Literal:
        return None
    if origin is list or base is list:
        args = get_args(base)
        element = args[0] if args else str
        return "N,N,..." if element in (int, float) else "A,B,..."
    if origin is dict or base is dict:
        return "JSON"
    return {int: "N", float: "X", str: "TEXT", Path: "PATH"}[base]


def _help_line(doc: str, f: dataclasses.Field) -> str:
    """The field's help text with its default, %-escaped for argparse's formatting."""
    if f.default is not dataclasses.MISSING:
        suffix = f"(default: {_show(f.default)})"
    elif f.default_factory is not dataclasses.MISSING:
        suffix = f"(default: {_show(f.default_factory())})"
    else:
        suffix = "(required)"
    return (f"{doc} {suffix}" if doc else suffix).replace("%", "%%")


def _show(value: Any) -> str:
    """A default as the user would type it: true/false, a,b,c, JSON for a dict, null for None, "" for empty text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "empty"
    if isinstance(value, dict):
        return json.dumps(value)
    if value == "":
        return '""'
    return str(value)


# ---------------------------------------------------------------------------------------- parsing


def parse_config(
    cls: type,
    argv: list[str] | None,
    prog: str,
    description: str | None = None,
    positional: tuple[str, ...] = (),
) -> Any:
    """Build a `cls` instance from the command line: dataclass defaults < `--config` YAML < flags.

    Args:
        cls: the config dataclass.
        argv: the arguments after the command name; None reads `sys.argv[1:]`.
        prog: program name shown in usage and errors, e.g. "lorakit train".
        description: text shown above the arguments in `--help`.
        positional: fields taken as positional arguments, as in `build_parser`.

    Returns:
        The `cls` instance.

    Raises:
        SystemExit: for `--help`, or a command-line error such as an unknown flag, a bad value, or a
            required field given neither as a flag nor in the YAML file (argparse prints the usage).
        LorakitError: for an unreadable or invalid `--config` file, or a value that `cls.__post_init__`
            rejects.
    """
    parser = build_parser(cls, prog, description, positional)
    given = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not _UNSET}
    config_path = given.pop("config", None)
    values = _read_yaml_values(cls, config_path) if config_path is not None else {}
    values.update(given)
    missing = [f.name for f in _init_fields(cls) if _is_required(f) and f.name not in values]
    if missing:
        shown = ", ".join(name.upper() if name in positional else "--" + name.replace("_", "-") for name in missing)
        parser.error(f"missing required {shown}: give it on the command line or as a key in --config FILE.yaml")
    return cls(**values)


def load_config(cls: type, path: str | os.PathLike) -> Any:
    """Build a `cls` instance from a YAML file such as one written by `save_config`.

    Args:
        cls: the config dataclass.
        path: the YAML file; keys are field names, missing keys take the dataclass defaults.

    Returns:
        The `cls` instance.

    Raises:
        LorakitError: for an unreadable or invalid file, an unknown key, a value of the wrong type, a
            required field missing, or a value that `cls.__post_init__` rejects.
    """
    values = _read_yaml_values(cls, path)
    missing = [f.name for f in _init_fields(cls) if _is_required(f) and f.name not in values]
    if missing:
        raise LorakitError(f"{path}: missing required key(s) {', '.join(missing)}; add them to the file.")
    return cls(**values)


def _read_yaml_values(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """The field values in a YAML file, checked against `cls` and converted to its field types."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorakitError(f"config file {str(path)!r} not found; check the --config path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LorakitError(f"cannot read config file {str(path)!r}: {exc}. Give a readable UTF-8 YAML file.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LorakitError(f"{path} is not valid YAML: {exc}. Fix the syntax at the position shown.") from None
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise LorakitError(
            f"{path} must hold a mapping of option names to values (e.g. 'r: 8'), not a {type(data).__name__}."
        )
    fields = {f.name: f for f in _init_fields(cls)}
    hints = _type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = (
                f"Did you mean {' or '.join(repr(name) for name in close)}?"
                if close
                else f"Valid keys: {', '.join(fields)}."
            )
            raise LorakitError(f"{path}: unknown key {key!r}. {hint}")
        try:
            values[key] = _coerce(value, hints[key])
        except _Mismatch:
            raise LorakitError(
                f"{path}: {key!r} must be {_describe(hints[key])}, got {value!r}. Fix the value in the file."
            ) from None
    return values


# ------------------------------------------------------------------------------------------- types


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None` / `Optional[T]`; (annotation, False) otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = get_args(annotation)
        rest = [member for member in members if member is not type(None)]
        if len(rest) == 1 and len(rest) < len(members):
            return rest[0], True
        raise TypeError(f"unsupported field type {annotation!r}: only `T | None` unions are supported.")
    return annotation, False


def _describe(annotation: Any) -> str:
    """What a value of `annotation` looks like, for error messages; TypeError if unsupported."""
    base, optional = _split_optional(annotation)
    origin = get_origin(base)
    if base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer"
    elif base is float:
        text = "a number"
    elif base is str:
        text = "a string"
    elif base is Path:
        text = "a path"
    elif origin is Literal:
        choices = get_args(base)
        if not all(isinstance(choice, (str, int, bool)) for choice in choices):
            raise TypeError(f"unsupported Literal {base!r}: choices must be str, int or bool.")
        text = "one of " + ", ".join(map(repr, choices))
    elif origin is list or base is list:
        args = get_args(base)
        element = args[0] if args else str
        if element not in _SCALARS and get_origin(element) is not Literal:
            raise TypeError(f"unsupported list element type in {base!r}.")
        example = "1,2,4" if element in (int, float) else "a,b"
        text = f"a list of items that are each {_describe(element)} (a YAML list, or text such as {example})"
    elif origin is dict or base is dict:
        args = get_args(base)
        if args and (args[0] is not str or (args[1] is not Any and args[1] not in _SCALARS)):
            raise TypeError(f"unsupported dict type {base!r}: use dict or dict[str, T] with a scalar T.")
        text = 'a mapping (a YAML mapping, or JSON text such as {"q_proj": 16})'
    else:
        raise TypeError(f"unsupported field type {annotation!r}.")
    return f"{text} or null" if optional else text


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` (from YAML, or command-line text) as `annotation`'s type; _Mismatch if it does not fit.

    Only lossless conversions: text that spells a number, an int for a float, an integral float for
    an int. YAML 1.1 reads `1e-4` (no dot) as text, so numbers arriving as text are the normal case.
    """
    base, optional = _split_optional(annotation)
    if value is None:
        if optional:
            return None
        raise _Mismatch
    origin = get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise _Mismatch
    if base is int:
        return _to_int(value)
    if base is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if base is str:
        # No str() of numbers or bools: `quantize: no` in YAML is False, and turning it into "False"
        # would hide the mistake; the error tells the user to quote the value instead.
        if isinstance(value, str):
            return value
        raise _Mismatch
    if base is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch
    if origin is Literal:
        for choice in get_args(base):
            if type(choice) is type(value) and choice == value:
                return choice
        raise _Mismatch
    if origin is list or base is list:
        args = get_args(base)
        element = args[0] if args else str
        if isinstance(value, str):
            items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # `layers: 3` for a list field means [3]
        return [_coerce(item, element) for item in items]
    if origin is dict or base is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise _Mismatch from None
        if not isinstance(value, dict):
            raise _Mismatch
        args = get_args(base)
        value_type = args[1] if args else Any
        if args and not all(isinstance(key, str) for key in value):
            raise _Mismatch
        if value_type is Any:
            return dict(value)
        return {key: _coerce(item, value_type) for key, item in value.items()}
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


# ---------------------------------------------------------------------------------------- writing


def config_to_yaml(obj: Any) -> str:
    """A config dataclass instance as YAML that `--config` reads back to an equal instance.

    Each key is preceded by its help text as a comment, so the file documents itself.

    Args:
        obj: a dataclass instance.

    Returns:
        The YAML text.

    Raises:
        TypeError: if `obj` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"config_to_yaml needs a dataclass instance, got {type(obj).__name__}.")
    helps = field_help(type(obj))
    blocks = []
    for f in _init_fields(type(obj)):
        comment = "".join(f"# {line}".rstrip() + "\n" for line in helps[f.name].splitlines())
        entry = yaml.safe_dump(
            {f.name: _plain(getattr(obj, f.name))},
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
            width=1_000_000,  # one line per value: no folding of long strings
        )
        blocks.append(comment + entry)
    return "\n".join(blocks)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write `config_to_yaml(obj)` to `path` atomically.

    Args:
        obj: a dataclass instance.
        path: the YAML file to write; parent directories are created.

    Raises:
        TypeError: if `obj` is not a dataclass instance.
    """
    atomic_write_text(path, config_to_yaml(obj))


def _plain(value: Any) -> Any:
    """`value` with Paths as text and tuples as lists, so yaml.safe_dump can write it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


# ---------------------------------------------------------------------------------------- helpers


def _require_dataclass_type(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}.")


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields the constructor takes (`init=False` fields are computed, not configured)."""
    _require_dataclass_type(cls)
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _type_hints(cls: type) -> dict[str, Any]:
    """Field annotations as types, resolving `from __future__ import annotations` strings."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        # A name only visible where the class was defined (e.g. inside a function): use the
        # annotations that are already types, and fail clearly for the ones that are not.
        hints = {}
        for f in dataclasses.fields(cls):
            if isinstance(f.type, str):
                raise TypeError(f"cannot resolve the annotation {f.type!r} of {cls.__name__}.{f.name}.") from None
            hints[f.name] = f.type
        return hints
