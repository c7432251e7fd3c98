"""`lorakit rank`: how much rank each adapted module really uses.

For each module the update dW = scaling * B A (B: d_out x r, A: r x d_in) has at most r singular values;
the effective rank at energy e is the fewest leading ones that hold the fraction e of sum(sigma^2),
i.e. of ||dW||_F^2. A module whose effective rank is well below r wastes parameters; `lorakit compress`
cuts it to that rank.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.factors import singular_values
from lorakit.core.io import PREFIX, read_adapter_config, read_adapter_tensors
from lorakit.core.matching import pattern_value

ENERGIES = (0.90, 0.95, 0.99)
# PEFT's key suffixes of the two factors: linear and conv layers, then embeddings.
_FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


@dataclass
class ModuleFactors:
    """One adapted module's factors as stored in the file, and the scaling PEFT's loader gives them.

    A is (r, d_in) for linear layers, (r, num_embeddings) for embeddings, (r, c_in, *kernel) for convs;
    B is (d_out, r), (dim, r) or (c_out, r, 1, ...). `flat()` gives both as matrices.
    """

    name: str
    a_key: str
    b_key: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B as d_out x r, A as r x d_in) in float32; a conv kernel is folded into d_in."""
        return self.B.float().flatten(1), self.A.float().flatten(1)


@dataclass
class AdapterFactors:
    """An adapter file split into LoRA factor pairs (by module path) and any other tensors (biases, saved modules)."""

    config: LoraConfig
    modules: dict[str, ModuleFactors]
    extra: dict[str, torch.Tensor]


def read_factors(directory: str | Path) -> AdapterFactors:
    """Read a PEFT-format LoRA adapter as factor pairs with their scalings.

    Args:
        directory: an adapter directory (adapter_config.json + adapter_model.safetensors).

    Returns:
        The config, the factors of each adapted module, and the remaining tensors.

    Raises:
        LorakitError: missing/corrupt files, an A without its B, or a factor whose rank differs from the
            rank the config gives its module.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    modules: dict[str, ModuleFactors] = {}
    for key in sorted(tensors, key=_natural_order):
        for a_suffix, b_suffix in _FACTOR_SUFFIXES:
            if not key.endswith(a_suffix):
                continue
            name = key.removeprefix(PREFIX).removesuffix(a_suffix)
            b_key = key.removesuffix(a_suffix) + b_suffix
            if b_key not in tensors:
                raise LorakitError(f"{directory}: {key} has no matching {b_key}; the adapter file is incomplete, save it again.")
            r = pattern_value(config.rank_pattern, name, config.r)
            alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
            A, B = tensors[key], tensors[b_key]
            if A.dim() < 2 or B.dim() < 2:
                raise LorakitError(f"{directory}: module {name} has factors of shapes {tuple(A.shape)} and "
                                   f"{tuple(B.shape)}; LoRA factors are matrices. The adapter file is corrupt.")
            if A.shape[0] != r or B.shape[1] != r:
                raise LorakitError(
                    f"{directory}: module {name} has rank {A.shape[0]} (A) / {B.shape[1]} (B) in the weights but {r} "
                    "in adapter_config.json (r / rank_pattern); the files do not belong together."
                )
            modules[name] = ModuleFactors(name, key, b_key, tensors[key], tensors[b_key], config.scaling_for(r, alpha))
    if not modules:
        raise LorakitError(f"{directory} holds no LoRA factors (lora_A / lora_B tensors); is it a LoRA adapter?")
    used = {m.a_key for m in modules.values()} | {m.b_key for m in modules.values()}
    return AdapterFactors(config, modules, {k: v for k, v in tensors.items() if k not in used})


def _natural_order(key: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def module_spectrum(factors: ModuleFactors) -> torch.Tensor:
    """The singular values of the module's update scaling * B A: descending, length r, exact (from the r x r core)."""
    B, A = factors.flat()
    return singular_values(B, A, factors.scaling)


def effective_rank(values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares sum to at least `energy` of the total.

    Args:
        values: singular values, descending, non-negative.
        energy: the fraction of ||dW||_F^2 to keep, in (0, 1].

    Returns:
        A count in [0, len(values)]; 0 for a zero update.

    Raises:
        LorakitError: `energy` outside (0, 1].
    """
    if not 0 < energy <= 1:
        raise LorakitError(f"energy must be in (0, 1], e.g. 0.95 (keep 95% of the update's squared norm); got {energy}.")
    cumulative = torch.cumsum(values.double() ** 2, 0)
    if cumulative.numel() == 0 or cumulative[-1] == 0:
        return 0
    return min(int((cumulative < energy * cumulative[-1]).sum()) + 1, cumulative.numel())


def module_kind(name: str) -> str:
    """The module type: the last part of its path ("model.layers.3.self_attn.q_proj" -> "q_proj")."""
    return name.rsplit(".", 1)[-1]


def module_depth(name: str) -> int | None:
    """The block index in the module's path ("model.layers.3.self_attn.q_proj" -> 3), or None."""
    match = re.search(r"\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def suggest_rank_pattern(spectra: dict[str, torch.Tensor], energy: float) -> dict[str, int]:
    """Per module type, the smallest rank that keeps `energy` of the update in every module of that type.

    Args:
        spectra: {module path: singular values}.
        energy: the fraction of each module's ||dW||_F^2 to keep.

    Returns:
        {module type: rank}, e.g. {"q_proj": 4, "v_proj": 6}: a PEFT/lorakit `rank_pattern` (a key
        matches every module whose path ends with it). A type whose updates are all zero gets 1.
    """
    pattern: dict[str, int] = {}
    for name, values in spectra.items():
        kind = module_kind(name)
        pattern[kind] = max(pattern.get(kind, 1), effective_rank(values, energy))
    return dict(sorted(pattern.items()))


def plot_spectra(spectra: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a PNG with one panel per module type and one curve per module, coloured by depth.

    Each curve is sigma_i against i on a shared log scale: its slope shows how much rank the module
    uses, its height how large its update is. Exact zeros (a rank-deficient update) are left out.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = sorted({module_kind(n) for n in spectra})
    top = max((d for d in map(module_depth, spectra) if d is not None), default=0)
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 2.6 * rows), squeeze=False, sharey=True,
                             constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes.flat, kinds):
        for name, values in spectra.items():
            index = [i + 1 for i, v in enumerate(values.tolist()) if v > 0]
            if module_kind(name) == kind and index:
                color = cmap((module_depth(name) or 0) / max(top, 1))
                ax.plot(index, values[values > 0].tolist(), "o-", color=color, lw=1, ms=2)
        ax.set_title(kind, fontsize=9)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("singular value index", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("singular value of dW", fontsize=8)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    scale = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, top))
    fig.colorbar(scale, ax=axes, label="layer (depth)", shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---- the command --------------------------------------------------------------------------------------
@dataclass
class RankConfig:
    adapter: str | None = None
    """Adapter directory (PEFT format) to analyze."""
    energy: float = 0.95
    """Energy (fraction of each update's squared Frobenius norm) the suggested rank_pattern keeps."""
    plot: str = "rank_spectrum.png"
    """Where to write the PNG of the spectra."""
    json: bool = False
    """Print a JSON object (every singular value) instead of a table."""


def analyze(directory: str | Path, energy: float = 0.95) -> dict:
    """The spectrum, effective ranks and a suggested rank_pattern of every module of an adapter.

    Args:
        directory: the adapter directory.
        energy: the energy the suggested rank_pattern keeps in every module.

    Returns:
        {"modules": {path: {"r", "singular_values", "effective_rank": {"0.9": k, ...}}},
         "suggested_rank_pattern": {type: rank}, "energy": energy}.

    Raises:
        LorakitError: unreadable adapter, or `energy` outside (0, 1].
    """
    effective_rank(torch.zeros(0), energy)  # validate before reading anything
    factors = read_factors(directory)
    spectra = {name: module_spectrum(m) for name, m in factors.modules.items()}
    modules = {
        name: {"r": values.numel(), "singular_values": values.tolist(),
               "effective_rank": {str(e): effective_rank(values, e) for e in ENERGIES}}
        for name, values in spectra.items()
    }
    return {"modules": modules, "suggested_rank_pattern": suggest_rank_pattern(spectra, energy), "energy": energy}


def run_rank(cfg: RankConfig) -> dict:
    """`lorakit rank ADAPTER`: print each module's spectrum summary and a suggested rank_pattern; plot the spectra."""
    if not cfg.adapter:
        raise LorakitError("lorakit rank needs an adapter directory: lorakit rank DIR.")
    result = analyze(cfg.adapter, cfg.energy)
    spectra = {name: torch.tensor(m["singular_values"]) for name, m in result["modules"].items()}
    result["plot"] = str(plot_spectra(spectra, cfg.plot))
    if cfg.json:
        print(json.dumps(result, indent=2))
        return result
    width = max(len(n) for n in result["modules"])
    header = " ".join(f"rank@{int(e * 100)}%" for e in ENERGIES)
    print(f"{'module':<{width}}    r   sigma_1  sigma_r/sigma_1  {header}")
    for name, m in result["modules"].items():
        values = m["singular_values"]
        ratio = values[-1] / values[0] if values[0] else 0.0
        ranks = " ".join(f"{m['effective_rank'][str(e)]:>8}" for e in ENERGIES)
        print(f"{name:<{width}} {m['r']:>4} {values[0]:>9.4f} {ratio:>16.2e}  {ranks}")
    print(f"\nsuggested rank_pattern (keeps >= {cfg.energy:.0%} of every module's update): "
          f"{json.dumps(result['suggested_rank_pattern'])}")
    print(f"spectrum plot: {result['plot']}")
    return result
