"""Which modules a config names: PEFT's rules for target_modules, layer indices and rank/alpha patterns."""
from __future__ import annotations

import re

from torch import nn

from lorakit.core.layers import is_transposed_linear

# Names of the block lists in common architectures (Llama "layers", GPT-2 "h", T5 "block", BERT "layer").
DEFAULT_LAYERS_PATTERN = "layers|h|block|blocks|layer"


def name_matches(patterns: list[str] | str | None, name: str) -> bool:
    """PEFT's target rule: a string is a regex the whole name must match; a list matches exact names and
    name suffixes at a dot boundary (["q_proj"] matches "model.layers.0.self_attn.q_proj")."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index in a module name ("model.layers.3.mlp" -> 3), or None outside the block list."""
    if isinstance(layers_pattern, list):
        layers_pattern = "|".join(map(re.escape, layers_pattern))
    match = re.search(rf"(?:^|\.)(?:{layers_pattern or DEFAULT_LAYERS_PATTERN})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def pattern_value(pattern: dict, name: str, default):
    """The value `rank_pattern` / `alpha_pattern` gives module `name`, or `default`."""
    # PEFT's rule: the first key that matches the end of the name at a dot boundary wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a transposed linear (GPT-2's Conv1D): what "all-linear" selects."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)
