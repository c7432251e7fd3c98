"""lorakit.training.config_types: the option types, in words, and lossless conversion to them."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import pytest

from lorakit.training.config_types import coerce_value, describe_type


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("8", int, 8), (8.0, int, 8), ("1e3", int, 1000), ("1e-4", float, 1e-4), (3, float, 3.0),
        ("off", bool, False), ("yes", bool, True), ("p", Path, Path("p")), (None, Optional[str], None),
        ("q_proj, v_proj", list[str], ["q_proj", "v_proj"]), (3, list[int], [3]), ("1,2", list[int], [1, 2]),
        ('{"q": 4}', dict[str, int], {"q": 4}), ({"q": "4"}, dict[str, int], {"q": 4}), (4, Literal[4, 8], 4),
    ],
)
def test_lossless_conversions(value, annotation, expected):
    out = coerce_value(value, annotation)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation"),
    [(8.5, int), (True, int), (7, str), (False, str), ("4", Literal[4, 8]), ("x", dict), (None, int), ("1,b", list[int])],
)
def test_lossy_or_wrong_values_are_refused(value, annotation):
    with pytest.raises(ValueError) as exc:
        coerce_value(value, annotation)
    assert str(exc.value) == f"expected {describe_type(annotation)}, got {value!r}"


def test_unsupported_types_are_type_errors():
    for annotation in (tuple[int, int], int | str, list[list[int]], dict[int, int], set):
        with pytest.raises(TypeError, match="unsupported"):
            describe_type(annotation)
