"""The dataclass is the CLI: a config dataclass parsed from the command line by tyro.

Each option becomes one flag (`lora_alpha` -> `--lora-alpha`) whose help is the docstring written under
its field; options of option groups (fields whose type is a dataclass) are flat flags too (`--r`, not
`--lora.r`). A value is resolved in this order, last one wins: the dataclass default, the `--config`
YAML file, the flags given on the command line. tyro builds the parser, the help and the usage errors;
what is lorakit's own is in the rules below: flag text converts as YAML values do (`config_types`:
lists from comma-separated text, dicts from JSON), and the YAML file's values become the defaults tyro
parses against.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Annotated, Any, Literal, get_args, get_origin

import tyro
from tyro.constructors import (
    MISSING,
    MISSING_NONPROP,
    ConstructorRegistry,
    PrimitiveConstructorSpec,
    PrimitiveTypeInfo,
    StructConstructorSpec,
    StructFieldSpec,
    StructTypeInfo,
)

from lorakit.training.config_file import (
    ConfigField,
    build_config,
    config_fields,
    field_types,
    is_group,
    read_config_values,
)
from lorakit.training.config_types import (
    coerce_value,
    describe_type,
    list_element,
    split_optional,
)

CONFIG_HELP = ("YAML file of option values (keys are the field names, e.g. lora_alpha); "
               "flags given on the command line override it.")


def parse_config(
    cls: type,
    argv: list[str] | None,
    prog: str,
    description: str | None = None,
    positional: tuple[str, ...] = (),
) -> Any:
    """Build a `cls` instance from the command line: dataclass defaults < `--config` YAML < flags.

    Args:
        cls: the config dataclass; fields whose type is a dataclass are option groups.
        argv: the arguments after the command name; None reads `sys.argv[1:]`.
        prog: program name shown in usage and errors, e.g. "lorakit train".
        description: text shown above the arguments in `--help`.
        positional: options taken as positional arguments instead of flags, e.g. ("adapter_dir",).

    Returns:
        The `cls` instance.

    Raises:
        SystemExit: for `--help` (0), or a command-line error such as an unknown or abbreviated flag, a
            bad value, or a required option given neither as a flag nor in the YAML file (2; the usage
            error names the flag, the expected type and the value).
        LorakitError: for an unreadable or invalid `--config` file, or a value that a `__post_init__`
            rejects.
        TypeError: if `cls` is not a dataclass, has an option named "config" or of an unsupported type,
            or `positional` names an option it lacks or a bool option.
    """
    options = config_fields(cls)
    _check_positional(cls, options, positional)
    # --config is read first: its values are the defaults that the flags then override.
    pre = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config", metavar="FILE.yaml")
    config_path = pre.parse_known_args(argv)[0].config
    file_values = read_config_values(cls, config_path) if config_path is not None else {}
    registry = _registry(cls, file_values, positional)
    values = tyro.cli(cls, args=argv, prog=prog, description=description or "", registry=registry,
                      config=(tyro.conf.OmitArgPrefixes,))
    # Built here, not by tyro: tyro would turn a LorakitError (a ValueError) from a __post_init__ into a
    # usage error, and the commands report those as errors of the run instead.
    return build_config(cls, _flatten(values))


def _check_positional(cls: type, options: dict, positional: tuple[str, ...]) -> None:
    if "config" in options:
        raise TypeError(f"{cls.__name__} has a field named 'config', which clashes with the --config flag.")
    for name in positional:
        if name not in options:
            raise TypeError(f"positional={positional!r}: {cls.__name__} has no field {name!r}.")
        if split_optional(options[name].type)[0] is bool:
            raise TypeError(f"positional field {name!r} is a bool; bools are --flag/--no-flag options.")


# ----------------------------------------------------------------------------------------------- rules


class _Values(dict):
    """The parsed options of a config dataclass or one of its groups: `build_config` builds them after parsing."""


def _registry(cls: type, file_values: dict[str, Any], positional: tuple[str, ...]) -> ConstructorRegistry:
    """tyro rules for `cls`: its options with the YAML values as defaults, and lorakit's value syntax."""
    registry = ConstructorRegistry()
    options = config_fields(cls)

    @registry.struct_rule
    def config_rule(info: StructTypeInfo) -> StructConstructorSpec | None:
        if not dataclasses.is_dataclass(info.type):
            return None
        hints = field_types(info.type)
        fields = []
        for f in (f for f in dataclasses.fields(info.type) if f.init):
            default = _field_default(f, info.default)
            if is_group(hints[f.name]):
                fields.append(StructFieldSpec(f.name, hints[f.name], default, None))
            else:
                fields.append(_option_spec(options[f.name], file_values.get(f.name, default), f.name in positional))
        if info.type is cls:
            fields.insert(0, StructFieldSpec("config", Annotated[str | None, tyro.conf.arg(
                metavar="FILE.yaml", help_behavior_hint="")], None, CONFIG_HELP))
        return StructConstructorSpec(instantiate=lambda config=None, **kw: _Values(kw), fields=tuple(fields))

    registry.primitive_rule(_value_rule)
    return registry


def _field_default(f: dataclasses.Field, parent_default: Any) -> Any:
    """The parent's default instance's value, else the field's default, else MISSING_NONPROP (required)."""
    unset = any(parent_default is sentinel for sentinel in (None, MISSING, MISSING_NONPROP))
    if not unset and hasattr(parent_default, f.name):
        return getattr(parent_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING_NONPROP


def _option_spec(option: ConfigField, default: Any, positional: bool) -> StructFieldSpec:
    """One option for tyro, its help ending in its default as the user would type it."""
    hint = None if default is MISSING_NONPROP else f"(default: {show_value(default)})"
    markers: list[Any] = [tyro.conf.Positional] if positional else []
    markers.append(tyro.conf.arg(metavar=option.name.upper() if positional else None, help_behavior_hint=hint))
    return StructFieldSpec(option.name, Annotated[(option.type, *markers)], default, option.help)


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in values.items():
        flat.update(_flatten(value) if isinstance(value, _Values) else {name: value})
    return flat


def _value_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """Every option but a plain bool (tyro's --flag/--no-flag pair): text converted as YAML values are."""
    annotation = info.type
    try:
        describe_type(annotation)
    except TypeError:
        return None  # not an option's type (the config dataclass and its groups are structs)
    base = split_optional(annotation)[0]
    if base is bool:
        return None
    choices = tuple(str(choice) for choice in get_args(base)) if get_origin(base) is Literal else None
    by_text = dict(zip(choices, get_args(base))) if choices else {}

    def from_text(args: list[str]) -> Any:
        if choices:
            return by_text[args[0]]
        return coerce_value(args[0], annotation)

    return PrimitiveConstructorSpec(
        nargs=1,
        metavar="{" + ",".join(choices) + "}" if choices else _metavar(base),
        instance_from_str=from_text,
        is_instance=lambda value: True,
        str_from_instance=lambda value: [show_value(value)],
        choices=choices,
    )


def _metavar(base: Any) -> str:
    """The placeholder shown in usage, e.g. `--r N`."""
    element = list_element(base)
    if element is not None:
        return "N,N,..." if element in (int, float) else "A,B,..."
    if base is dict or get_origin(base) is dict:
        return "JSON"
    return {int: "N", float: "X", str: "TEXT"}.get(base, "PATH")


def show_value(value: Any) -> str:
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
