"""A config dataclass as a flat YAML file (a run's `config.yaml`), and the checked reading of one.

A config dataclass may compose option groups: a field whose type is a dataclass is a group. The file is
flat all the same: each option sits under its own name, without its group's (`r: 8`, not `lora: {r: 8}`),
so option names must be unique across groups. Each option's help is the docstring written under its field
(`field(metadata={"help": ...})` otherwise); the written file carries it as a comment.

The option types supported, and how values convert to them, are `config_types`'s.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import typing
from pathlib import Path
from typing import Any

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_write_text
from lorakit.training.config_types import coerce_value, describe_type


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One option of a config dataclass, at whatever depth of option groups it sits."""

    name: str
    """The field name: the YAML key, and (with dashes) the command-line flag."""
    type: Any
    """The field's annotation, resolved to a type."""
    field: dataclasses.Field
    """The dataclass field itself (default, default_factory)."""
    help: str
    """The docstring under the field, else its metadata "help", else ""."""
    group: tuple[str, ...] = ()
    """The group fields leading to it from the top-level dataclass; () for a top-level option."""
    required: bool = False
    """Neither the field nor any group above it has a default."""


# ---------------------------------------------------------------------------------------------- fields


def config_fields(cls: type) -> dict[str, ConfigField]:
    """Every option of a config dataclass, option groups flattened, in field order.

    Args:
        cls: a dataclass type; fields whose type is a dataclass are option groups.

    Returns:
        {option name: ConfigField}.

    Raises:
        TypeError: if `cls` is not a dataclass type, an option has an unsupported type, or two options
            share a name.
    """
    out: dict[str, ConfigField] = {}
    _collect_fields(cls, (), False, out)
    return out


def _collect_fields(cls: type, group: tuple[str, ...], has_default: bool, out: dict[str, ConfigField]) -> None:
    hints = field_types(cls)
    helps = _own_field_help(cls)
    for f in _init_fields(cls):
        annotation = hints[f.name]
        defaulted = has_default or not _is_required(f)
        if is_group(annotation):
            _collect_fields(annotation, group + (f.name,), defaulted, out)
            continue
        if f.name in out:
            where = ".".join(out[f.name].group) or cls.__name__
            raise TypeError(f"option {f.name!r} of {cls.__name__} repeats the name of one in {where}; "
                            "option names must be unique across groups.")
        describe_type(annotation)  # fails now, not at parse time, for an unsupported type
        out[f.name] = ConfigField(f.name, annotation, f, helps[f.name], group, not defaulted)


def is_group(annotation: Any) -> bool:
    """Whether a field of this type is an option group (a dataclass type)."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def field_help(cls: type) -> dict[str, str]:
    """The help text of each option of a config dataclass (option groups flattened).

    The text is the docstring written under the field (base dataclasses included; a subclass's own
    docstring wins), else `field(metadata={"help": ...})`, else "".

    Args:
        cls: a dataclass type.

    Returns:
        {option name: help text}, in field order.

    Raises:
        TypeError: as `config_fields`.
    """
    return {name: option.help for name, option in config_fields(cls).items()}


def _own_field_help(cls: type) -> dict[str, str]:
    """{field name: help} for the fields of `cls` itself (not of its groups)."""
    docs: dict[str, str] = {}
    # Base classes first, so that a subclass that documents a field again overrides the base's text.
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_attribute_docstrings(klass))
    return {f.name: docs.get(f.name) or str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def _attribute_docstrings(klass: type) -> dict[str, str]:
    """{name: docstring} for `name: T = ...` statements directly followed by a string literal."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
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


# ------------------------------------------------------------------------------------------- building


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """A `cls` instance from flat option values; options not given keep their defaults.

    Each option group is built from its own options; a group field's default instance (its
    `default_factory`) supplies the options not given.

    Args:
        cls: the config dataclass.
        values: {option name: value}, values already of the option's type.

    Returns:
        The `cls` instance (its `__post_init__`, and its groups', have run).

    Raises:
        LorakitError: from a `__post_init__`.
    """
    return _build(cls, values, None)


def _build(cls: type, values: dict[str, Any], defaults: Any) -> Any:
    hints = field_types(cls)
    kwargs: dict[str, Any] = {}
    for f in _init_fields(cls):
        if is_group(hints[f.name]):
            group_default = getattr(defaults, f.name) if defaults is not None else _default_of(f)
            kwargs[f.name] = _build(hints[f.name], values, group_default)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif defaults is not None:
            kwargs[f.name] = getattr(defaults, f.name)
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    """The field's default value (None when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


# ---------------------------------------------------------------------------------------------- reading


def load_config(cls: type, path: str | os.PathLike) -> Any:
    """Build a `cls` instance from a YAML file such as one written by `save_config`.

    Args:
        cls: the config dataclass.
        path: the YAML file; keys are option names, missing keys take the dataclass defaults.

    Returns:
        The `cls` instance.

    Raises:
        LorakitError: for an unreadable or invalid file, an unknown key, a value of the wrong type, a
            required option missing, or a value that a `__post_init__` rejects.
    """
    values = read_config_values(cls, path)
    missing = [name for name, option in config_fields(cls).items() if option.required and name not in values]
    if missing:
        raise LorakitError(f"{path}: missing required key(s) {', '.join(missing)}; add them to the file.")
    return build_config(cls, values)


def read_config_values(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """The option values in a YAML file, checked against `cls` and converted to the options' types.

    Args:
        cls: the config dataclass.
        path: the YAML file: a mapping of option names to values.

    Returns:
        {option name: value} for the keys in the file.

    Raises:
        LorakitError: for a missing, unreadable or malformed file, an unknown key (naming the closest
            option names), or a value of the wrong type (naming the key, the expected type and the value).
    """
    import yaml

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
    except RecursionError:
        raise LorakitError(f"{path} nests lists or mappings too deeply to read; a config is a flat mapping.") from None
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise LorakitError(
            f"{path} must hold a mapping of option names to values (e.g. 'r: 8'), not a {type(data).__name__}."
        )
    options = config_fields(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in options:
            close = difflib.get_close_matches(str(key), list(options), n=3)
            hint = (f"Did you mean {' or '.join(repr(name) for name in close)}?" if close
                    else f"Valid keys: {', '.join(options)}.")
            raise LorakitError(f"{path}: unknown key {key!r}. {hint}")
        try:
            values[key] = coerce_value(value, options[key].type)
        except ValueError:
            raise LorakitError(
                f"{path}: {key!r} must be {describe_type(options[key].type)}, got {value!r}. Fix the value in the file."
            ) from None
    return values


# ---------------------------------------------------------------------------------------------- writing


def config_to_yaml(obj: Any) -> str:
    """A config dataclass instance as flat YAML that `load_config` (and `--config`) reads back equal.

    Options of groups are written under their own names, without the group's. Each key is preceded
    by its help text as a comment, so the file documents itself.

    Args:
        obj: a dataclass instance.

    Returns:
        The YAML text.

    Raises:
        TypeError: if `obj` is not a dataclass instance.
    """
    import yaml

    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"config_to_yaml needs a dataclass instance, got {type(obj).__name__}.")
    values = config_values(obj)
    blocks = []
    for name, option in config_fields(type(obj)).items():
        comment = "".join(f"# {line}".rstrip() + "\n" for line in option.help.splitlines())
        entry = yaml.safe_dump(
            {name: _plain(values[name])},
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
            width=1_000_000,  # one line per value: no folding of long strings
        )
        blocks.append(comment + entry)
    return "\n".join(blocks)


def config_values(obj: Any) -> dict[str, Any]:
    """{option name: value} of a config dataclass instance, option groups flattened: what `build_config`
    takes back.

    Raises:
        TypeError: if `obj` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"config_values needs a dataclass instance, got {type(obj).__name__}.")
    values = {}
    for name, option in config_fields(type(obj)).items():
        holder = obj
        for group in option.group:
            holder = getattr(holder, group)
        values[name] = getattr(holder, name)
    return values


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


# ---------------------------------------------------------------------------------------------- helpers


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields the constructor takes (`init=False` fields are computed, not configured)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}.")
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def field_types(cls: type) -> dict[str, Any]:
    """{field name: annotation as a type} of a dataclass, `from __future__ import annotations` strings resolved.

    Raises:
        TypeError: for an annotation that names something not visible from the class's module.
    """
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
