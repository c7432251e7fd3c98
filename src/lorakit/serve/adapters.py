"""Adapters ready to serve: read from PEFT directories, checked against the base, stacked per projection
group, and kept in a least-recently-used store of bounded size.

The engine runs projections that share an input as one GEMM (q/k/v, gate/up). An adapter is laid out to
match: for each group, the A factors of its projections are stacked, A: (layers, R, d_in), and the scaled
B factors form a block-diagonal Bt: (layers, R, d_out), so that x A^T Bt is the update of the whole fused
output in two products. Projection i owns rows offsets[i]..offsets[i] + ranks[i] of A and Bt in every
layer, its rank being its largest over the layers; a layer of lower rank is zero-padded (zero rows add
nothing). rank_pattern / alpha_pattern / rsLoRA give each module its own scaling, folded into Bt. DoRA adds
g = m / ||W + s B A|| per output row (1 where the adapter is plain LoRA), computed once at load.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.io import PREFIX, read_adapter_config, read_adapter_tensors
from lorakit.core.matching import pattern_value

_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m",
             "lora_magnitude_vector.weight": "m"}


@dataclass(frozen=True)
class GroupLayout:
    """Projections of one layer that share an input and run as one fused GEMM, outputs side by side.

    Attributes:
        name: the group ("qkv", "o", "gate_up", "down").
        modules: the projections' full module names, in output order.
        out_sizes: each projection's output width.
        in_features: the shared input width.
    """

    name: str
    modules: tuple[str, ...]
    out_sizes: tuple[int, ...]
    in_features: int

    @property
    def out_features(self) -> int:
        return sum(self.out_sizes)


@dataclass
class GroupFactors:
    """One adapter's factors for one group in every layer (see the module docstring)."""

    A: torch.Tensor  # (layers, R, d_in)
    Bt: torch.Tensor  # (layers, R, d_out): scaling * B^T, block-diagonal over the group's projections
    g: torch.Tensor | None  # (layers, d_out) DoRA's per-row scale, None without DoRA
    present: list[bool]  # layers where the adapter adapts some projection of the group
    ranks: tuple[int, ...]  # each projection's rank (0: not adapted), its rows of A and Bt in order
    widths: tuple[int, ...]  # each projection's output width, its columns of Bt in order
    kernel_table: torch.Tensor | None = field(default=None, repr=False, compare=False)  # lora_kernel's, made once

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass(eq=False)
class AdapterWeights:
    """A loaded adapter, laid out for serving. `pins` counts the running requests that use it."""

    name: str
    directory: Path
    groups: dict[str, GroupFactors]
    pins: int = 0
    uses_dora: bool = False
    nbytes: int = field(default=0)


def _check_config(config: LoraConfig, source: str) -> None:
    problems = [(config.modules_to_save, "modules_to_save (full copies of modules)"),
                (config.bias != "none", f"bias={config.bias!r} (trained biases)"),
                (config.init_lora_weights == "pissa", "an unconverted PiSSA adapter")]
    for bad, what in problems:
        if bad:
            raise LorakitError(f"{source}: the engine serves LoRA and DoRA factors only, and this adapter has {what}; "
                               "merge it into a model with `lorakit merge` and serve that model instead.")


def _parse(tensors: dict[str, torch.Tensor], known: dict[str, tuple[int, str, int]], source: str) -> dict:
    """{module name: {"A"|"B"|"m": tensor}} from PEFT keys, refusing keys of modules the engine does not adapt."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _SUFFIXES if name.endswith("." + s)), None)
        module = name[:-len(suffix) - 1] if suffix else name
        if suffix is None or module not in known:
            raise LorakitError(
                f"{source}: tensor {key!r} is not a LoRA factor of a decoder layer's projection this model has "
                "(q/k/v/o_proj, gate/up/down_proj); the engine serves adapters on those projections only, "
                "for this base model.")
        found.setdefault(module, {})[_SUFFIXES[suffix]] = tensor
    return found


def _module_factors(name: str, parts: dict, shape: tuple[int, int], config: LoraConfig, source: str):
    """(A (r, d_in), scaled B (d_out, r), magnitude or None) of one module, checked against the base's shape."""
    d_out, d_in = shape
    if "A" not in parts or "B" not in parts:
        raise LorakitError(f"{source}: module {name} has only {sorted(parts)} of lora_A/lora_B; the file is incomplete.")
    A, B = parts["A"].float(), parts["B"].float()
    r = A.shape[0] if A.dim() == 2 else "r"
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or tuple(B.shape) != (d_out, r):
        raise LorakitError(f"{source}: module {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but this "
                           f"base needs ({r}, {d_in}) and ({d_out}, {r}); the adapter was trained on another base model.")
    if pattern_value(config.rank_pattern, name, config.r) != r:
        raise LorakitError(f"{source}: module {name} has rank {r} in the file but its config says "
                           f"{pattern_value(config.rank_pattern, name, config.r)}; save the adapter again.")
    if config.use_dora != ("m" in parts):
        raise LorakitError(f"{source}: use_dora={config.use_dora} but module {name} "
                           f"{'lacks' if config.use_dora else 'has'} a lora_magnitude_vector; save the adapter again.")
    if "m" in parts and tuple(parts["m"].shape) != (d_out,):
        raise LorakitError(f"{source}: module {name} has a magnitude of shape {tuple(parts['m'].shape)}, expected ({d_out},).")
    scaling = config.scaling_for(r, pattern_value(config.alpha_pattern, name, config.lora_alpha))
    return A, B * scaling, parts.get("m")


def _stack_group(layers: list[GroupLayout], per_module: dict, base_weight: Callable[[str], torch.Tensor],
                 dtype: torch.dtype, device: torch.device) -> GroupFactors | None:
    """One group's factors of every layer, stacked and zero-padded to the largest rank (see module docstring)."""
    ranks = tuple(max((per_module[layout.modules[i]][0].shape[0] for layout in layers if layout.modules[i] in per_module),
                      default=0) for i in range(len(layers[0].modules)))
    R = sum(ranks)
    if R == 0:
        return None
    first = layers[0]
    A = torch.zeros(len(layers), R, first.in_features)
    Bt = torch.zeros(len(layers), R, first.out_features)
    uses_dora = any(per_module[m][2] is not None for layout in layers for m in layout.modules if m in per_module)
    g = torch.ones(len(layers), first.out_features) if uses_dora else None
    present = []
    for i, layout in enumerate(layers):
        row, col = 0, 0
        for module, width, rank in zip(layout.modules, layout.out_sizes, ranks):
            if module in per_module:
                a, b, m = per_module[module]
                A[i, row:row + a.shape[0]] = a
                Bt[i, row:row + a.shape[0], col:col + width] = b.T
                if m is not None:  # DoRA: ||W + s B A|| per output row, the norm PEFT and lorakit use
                    norm = torch.linalg.vector_norm(base_weight(module).float() + b @ a, dim=1)
                    g[i, col:col + width] = m.float() / norm
            row += rank
            col += width
        present.append(any(m in per_module for m in layout.modules))
    to = {"dtype": dtype, "device": device}
    return GroupFactors(A.to(**to), Bt.to(**to), None if g is None else g.to(**to), present, ranks, first.out_sizes)


def read_adapter(name: str, directory: str | Path, layout: list[list[GroupLayout]],
                 base_weight: Callable[[str], torch.Tensor], dtype: torch.dtype, device: torch.device) -> AdapterWeights:
    """Read a LoRA/DoRA adapter directory (written by lorakit or PEFT) and lay it out for serving.

    Args:
        name: the name it will be served under.
        directory: the adapter directory (adapter_config.json + adapter_model.safetensors).
        layout: [layer][group] of the base model (`GroupLayout`).
        base_weight: module name -> its base weight (d_out, d_in), for DoRA's norms.
        dtype, device: where the factors will live.

    Returns:
        The adapter's factors per group.

    Raises:
        LorakitError: missing or corrupt files, settings the engine cannot serve (trained biases, saved
            modules, embeddings or the output head), or shapes that do not fit this base.
    """
    source = str(directory)
    config = read_adapter_config(directory)
    _check_config(config, source)
    tensors = read_adapter_tensors(directory)
    known = {m: (i, g.name, w) for i, groups in enumerate(layout) for g in groups for m, w in zip(g.modules, g.out_sizes)}
    parsed = _parse(tensors, known, source)
    if not parsed:
        raise LorakitError(f"{source}: the adapter holds no LoRA factors.")
    in_features = {m: g.in_features for groups in layout for g in groups for m in g.modules}
    per_module = {m: _module_factors(m, parts, (known[m][2], in_features[m]), config, source) for m, parts in parsed.items()}
    groups: dict[str, GroupFactors] = {}
    for column in zip(*layout):  # one group across the layers
        stacked = _stack_group(list(column), per_module, base_weight, dtype, device)
        if stacked is not None:
            groups[column[0].name] = stacked
    nbytes = sum(t.numel() * t.element_size() for f in groups.values() for t in (f.A, f.Bt, f.g) if t is not None)
    return AdapterWeights(name, Path(directory), groups, uses_dora=config.use_dora, nbytes=nbytes)


class AdapterStore:
    """Named adapters: every registered name keeps its directory; at most `max_loaded` are held in memory.

    When a load needs room, the least recently used adapter that no running request uses is dropped; a
    request for a dropped adapter reads it again. Not thread-safe: the engine serializes calls.

    Args:
        reader: (name, directory) -> AdapterWeights, raising LorakitError for a bad directory.
        max_loaded: adapters held in memory at once.
    """

    def __init__(self, reader: Callable[[str, Path], AdapterWeights], max_loaded: int) -> None:
        if not isinstance(max_loaded, int) or max_loaded < 1:
            raise LorakitError(f"max_loaded_adapters={max_loaded!r} is invalid: give a positive integer.")
        self.reader, self.max_loaded = reader, max_loaded
        self.directories: dict[str, Path] = {}
        self.loaded: OrderedDict[str, AdapterWeights] = OrderedDict()  # least recently used first

    def register(self, weights: AdapterWeights) -> None:
        """Add an adapter already read (by `reader`), keeping it in memory if there is room.

        Raises:
            LorakitError: the name is taken.
        """
        if weights.name in self.directories:
            raise LorakitError(f"an adapter named {weights.name!r} is already loaded; unload it first or pick another name.")
        self.directories[weights.name] = weights.directory
        self._keep(weights)

    def unregister(self, name: str) -> None:
        """Forget `name`; running requests that use it keep their reference until they finish.

        Raises:
            LorakitError: no adapter has that name.
        """
        self.check(name)
        del self.directories[name]
        self.loaded.pop(name, None)

    def check(self, name: str) -> None:
        """Raise LorakitError if `name` is not a registered adapter."""
        if name not in self.directories:
            names = ", ".join(sorted(self.directories)) or "none"
            raise LorakitError(f"no adapter named {name!r} is loaded (loaded: {names}); load it first.")

    def acquire(self, name: str) -> AdapterWeights | None:
        """The adapter `name`, pinned for a running request; read again if it was dropped.

        Returns:
            The weights, or None when memory is full of adapters that running requests use (try later).

        Raises:
            LorakitError: no such adapter, or its directory cannot be read any more.
        """
        self.check(name)
        weights = self.loaded.get(name)
        if weights is None:
            if len(self.loaded) >= self.max_loaded and not self._evictable():
                return None
            weights = self.reader(name, self.directories[name])
            self._keep(weights)
        self.loaded.move_to_end(name)
        weights.pins += 1
        return weights

    @staticmethod
    def release(weights: AdapterWeights) -> None:
        """Unpin an adapter a request no longer uses."""
        weights.pins -= 1

    def _evictable(self) -> str | None:
        return next((n for n, w in self.loaded.items() if w.pins == 0), None)

    def _keep(self, weights: AdapterWeights) -> None:
        while len(self.loaded) >= self.max_loaded and (victim := self._evictable()) is not None:
            del self.loaded[victim]
        if len(self.loaded) < self.max_loaded:
            self.loaded[weights.name] = weights

