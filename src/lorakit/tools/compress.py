"""`lorakit compress`: cut each module's LoRA update to a lower rank by SVD and write a standard adapter.

A module's update dW = s B A (rank r) = U S V^T. Its best rank-k approximation (Eckart-Young) keeps
the top k singular triplets, with relative Frobenius error sqrt(sum_{i>k} S_i^2 / sum_i S_i^2). The
output is an ordinary PEFT-format LoRA whose per-module ranks are exact `rank_pattern` entries, so
both lorakit and PEFT load it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.core.config import config_for_ranks, file_scaling
from lorakit.core.errors import LorakitError
from lorakit.core.io import write_adapter_files
from lorakit.tools.rank import (
    ModuleFactors,
    effective_rank,
    module_spectrum,
    read_factors,
)


# ---- truncation ------------------------------------------------------------------------------------
@dataclass
class Truncation:
    """One module cut to rank k: new factors in the file's shapes, and what was lost."""

    A: torch.Tensor
    B: torch.Tensor
    kept_energy: float      # sum of the kept S_i^2
    total_energy: float     # ||dW||_F^2

    @property
    def relative_error(self) -> float:
        """||dW - dW_k||_F / ||dW||_F (0 for a zero update)."""
        lost = max(self.total_energy - self.kept_energy, 0.0)
        return math.sqrt(lost / self.total_energy) if self.total_energy > 0 else 0.0


def truncate(m: ModuleFactors, k: int, scaling: float) -> Truncation:
    """The best rank-k factors of module `m`'s update, rescaled so that `scaling` * B' A' is that approximation.

    At k >= r the file's own factors are kept (B only rescaled), so nothing changes.

    Args:
        m: the module's factors.
        k: the rank to keep: at least r, or at most min(r, d_out, d_in) (the number of singular values).
        scaling: the scaling the written module will get (`file_scaling`).

    Returns:
        The truncation, with A' (k, ...) and B' (..., k, ...) in the shapes of m.A and m.B.
    """
    B, A = m.flat()                       # (d_out, r), (r, d_in)
    Q_b, R_b = torch.linalg.qr(B)         # (d_out, r), (r, r)
    Q_a, R_a = torch.linalg.qr(A.T)       # (d_in, r), (r, r)
    # dW = s B A = Q_b (s R_b R_a^T) Q_a^T: the SVD of the r x r core gives dW's.
    U, S, Vh = torch.linalg.svd(m.scaling * (R_b @ R_a.T))
    total, kept = float((S.double() ** 2).sum()), float((S[:k].double() ** 2).sum())
    if k >= m.rank:
        return Truncation(m.A, m.B * (m.scaling / scaling), total, total)
    # Split the kept singular values evenly between the factors, as merge.svd_factors does.
    root = (S[:k] / scaling).sqrt()
    B_k = (Q_b @ U[:, :k]) * root                  # (d_out, k)
    A_k = root[:, None] * (Vh[:k] @ Q_a.T)         # (k, d_in)
    return Truncation(A_k.reshape(k, *m.A.shape[1:]), B_k.reshape(m.B.shape[0], k, *m.B.shape[2:]), kept, total)


def compress_adapter(source: str | Path, output: str | Path, rank: int | None = None,
                     energy: float | None = None) -> dict:
    """Truncate every module of the adapter in `source` by SVD and write the result to `output`.

    Args:
        source: a PEFT-format LoRA adapter directory.
        output: where to write the compressed adapter (not `source`).
        rank: keep min(rank, r) singular triplets in every module; or
        energy: keep, in each module, the fewest triplets that hold this fraction of ||dW||_F^2.

    Returns:
        {"modules": {path: {r_before, r_after, params_before, params_after, relative_error}},
         "total": the same summed (relative_error over the whole adapter), "output": path}.

    Raises:
        LorakitError: neither or both of rank/energy, a bad value, output == source, or an unreadable adapter.
    """
    if (rank is None) == (energy is None):
        raise LorakitError("give exactly one of --rank N (keep N per module) or --energy X (e.g. 0.95).")
    if rank is not None and rank <= 0:
        raise LorakitError(f"--rank must be a positive integer, got {rank}.")
    if energy is not None:
        effective_rank(torch.zeros(0), energy)  # validates the range
    if Path(output).resolve() == Path(source).resolve():
        raise LorakitError(f"--output {output} is the input adapter; write the compressed adapter to another directory.")
    factors = read_factors(source)
    # The rank of each module fixes the config, whose scaling the new factors must absorb: first the
    # ranks (cheap, from the r x r cores), then the factors.
    ranks = {name: _kept_rank(m, rank, energy) for name, m in factors.modules.items()}
    config = config_for_ranks(factors.config, ranks)
    tensors = dict(factors.extra)
    modules, kept_total, energy_total = {}, 0.0, 0.0
    for name, m in factors.modules.items():
        cut = truncate(m, ranks[name], file_scaling(config, ranks[name]))
        tensors[m.a_key], tensors[m.b_key] = cut.A, cut.B
        kept_total += cut.kept_energy
        energy_total += cut.total_energy
        modules[name] = {"r_before": m.rank, "r_after": ranks[name], "params_before": m.A.numel() + m.B.numel(),
                         "params_after": cut.A.numel() + cut.B.numel(), "relative_error": cut.relative_error}
    write_adapter_files(output, config.to_dict(), {k: v.detach().contiguous() for k, v in tensors.items()})
    total = {key: sum(m[key] for m in modules.values()) for key in ("r_before", "r_after", "params_before", "params_after")}
    total["relative_error"] = math.sqrt(max(energy_total - kept_total, 0.0) / energy_total) if energy_total > 0 else 0.0
    return {"modules": modules, "total": total, "output": str(output)}


def _kept_rank(m: ModuleFactors, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        if rank >= m.rank:
            return m.rank
        B, A = m.flat()
        # An update has min(r, d_out, d_in) singular values; r exceeds d_out or d_in only in toy models.
        return min(rank, B.shape[0], A.shape[1])
    return max(1, effective_rank(module_spectrum(m), energy))


# ---- the command --------------------------------------------------------------------------------------
@dataclass
class CompressConfig:
    adapter: str | None = None
    """Adapter directory (PEFT format) to compress."""
    output: str | None = None
    """Directory for the compressed adapter."""
    rank: int | None = None
    """Keep at most N singular triplets per module."""
    energy: float | None = None
    """Keep, per module, the fewest singular triplets holding this fraction of the update's squared norm (e.g. 0.95)."""
    eval_data: str | None = None
    """Also measure the task metric before and after: a .jsonl/.csv/.txt file, or 'builtin' (the built-in task's held-out set)."""
    model: str | None = None
    """Base model for --eval-data; omitted: the adapter's recorded base, else the embedded default."""
    eval_samples: int = 100
    """Held-out samples for greedy-generation exact match (and the size of the 'builtin' set)."""
    max_new_tokens: int = 48
    """Generation length for exact match."""
    max_seq_len: int = 512
    """Longest evaluation sample in tokens (longer ones are cut)."""
    device: str | None = None
    """cpu, cuda ...; default: cuda if available."""
    json: bool = False
    """Print a JSON object instead of a table."""


def evaluate_adapters(adapters: dict[str, str | Path], cfg: CompressConfig) -> dict[str, dict]:
    """Held-out loss, perplexity and (instruction/chat data) exact match of each adapter on one loaded base.

    Args:
        adapters: {label: adapter directory}; all must fit the same base model.
        cfg: the evaluation settings (eval_data, model, eval_samples, max_new_tokens, max_seq_len, device).

    Returns:
        {label: {"loss", "perplexity", "exact_match" (None for plain text)}}, measured by
        `lorakit.training.evaluate.evaluate` (without the forgetting probe).
    """
    from lorakit.core.active import set_adapter
    from lorakit.core.io import load_adapter, read_adapter_config
    from lorakit.training.data.sets import load_eval_set
    from lorakit.training.evaluate import evaluate
    from lorakit.training.models import compute_dtype, load_model

    first = next(iter(adapters.values()))
    loaded = load_model(cfg.model or read_adapter_config(first).base_model_name_or_path, device=cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.to(compute_dtype("auto", model.device))
    path = None if cfg.eval_data == "builtin" else cfg.eval_data
    data = load_eval_set(path, tokenizer, max_seq_len=cfg.max_seq_len, builtin_samples=cfg.eval_samples)
    results = {}
    for label, directory in adapters.items():
        load_adapter(model, directory, adapter_name=label)
        set_adapter(model, label)
        result = evaluate(model, tokenizer, data, model.device, cfg.eval_samples, cfg.max_new_tokens, probe=False)
        results[label] = {"loss": result.loss, "perplexity": result.perplexity, "exact_match": result.exact_match}
    return results


def run_compress(cfg: CompressConfig) -> dict:
    """`lorakit compress ADAPTER --rank N | --energy X --output DIR`: write the compressed adapter and report the loss."""
    if not cfg.adapter or not cfg.output:
        raise LorakitError("lorakit compress needs an adapter directory and --output DIR: "
                           "lorakit compress ADAPTER --energy 0.95 --output DIR.")
    result = compress_adapter(cfg.adapter, cfg.output, rank=cfg.rank, energy=cfg.energy)
    if cfg.eval_data:
        result["eval"] = evaluate_adapters({"before": cfg.adapter, "after": cfg.output}, cfg)
    if cfg.json:
        print(json.dumps(result, indent=2))
        return result
    print(_table(result))
    return result


def _table(result: dict) -> str:
    """The per-module and total report as a Markdown table, then the metrics before/after."""
    lines = ["| module | rank | parameters | relative error of dW |", "|---|---|---|---|"]
    rows = list(result["modules"].items()) + [("**total**", result["total"])]
    for name, m in rows:
        lines.append(f"| {name} | {m['r_before']} -> {m['r_after']} | {m['params_before']:,} -> {m['params_after']:,} "
                     f"| {m['relative_error']:.2e} |")
    if "eval" in result:
        before, after = result["eval"]["before"], result["eval"]["after"]
        lines += ["", "| metric | before | after |", "|---|---|---|"]
        for key in ("loss", "perplexity", "exact_match"):
            if before.get(key) is not None:
                lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    lines.append(f"\ncompressed adapter: {result['output']}")
    return "\n".join(lines)
