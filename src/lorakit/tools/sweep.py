"""`lorakit sweep`: train the same task at several ranks (or with several methods) and compare.

Every run is `lorakit train` with one field changed (`r` or `method`), the same seed and data, in a
fresh subprocess so that its peak memory is its own. The sweep directory holds one run directory per
value, sweep.json (everything measured), sweep.md (the table) and sweep.png (the plot). The table marks
the cheapest run (fewest trainable parameters: for ranks, the smallest rank) whose held-out quality is
within --tolerance of the best.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lorakit.core.errors import LorakitError
from lorakit.core.fsutil import atomic_write_text
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import build_config, config_values
from lorakit.training.loop import train

RESULT_NAME = "sweep_result.json"
# Rounding room in the tolerance test: 0.84 - 0.02 must still admit 0.82.
_SLACK = 1e-9


@dataclass
class SweepConfig(TrainConfig):
    output: str = "runs/sweep"
    """Sweep directory: one run directory per value, sweep.json, sweep.md, sweep.png."""
    ranks: list[int] = field(default_factory=list)
    """Ranks to train at, e.g. 1,2,4,8,16 (each run sets --r). Give this or --methods."""
    methods: list[str] = field(default_factory=list)
    """Methods to train with, e.g. lora,adalora (each run sets --method). Give this or --ranks."""
    metric: Literal["auto", "exact_match", "loss"] = "auto"
    """Held-out quality to compare: exact match (instruction/chat data), else held-out loss; auto picks."""
    tolerance: float = 1.0
    """How far below the best a run may be and still count: exact-match points, or percent of the best loss."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.ranks) == bool(self.methods):
            raise LorakitError("give exactly one of --ranks 1,2,4,8 or --methods lora,adalora to sweep over.")
        if any(r <= 0 for r in self.ranks):
            raise LorakitError(f"--ranks must be positive integers, got {self.ranks}.")
        if len(set(self.ranks)) != len(self.ranks) or len(set(self.methods)) != len(self.methods):
            raise LorakitError("--ranks / --methods lists a value twice; give each once.")
        if self.tolerance < 0:
            raise LorakitError(f"--tolerance must be >= 0, got {self.tolerance}.")


def run_configs(cfg: SweepConfig) -> dict[str, TrainConfig]:
    """The training run of each sweep value, by label ("r=4", "adalora"), in sweep order.

    Every run has the sweep's train settings with `r` or `method` replaced, and its own run directory.

    Raises:
        LorakitError: a value the training config rejects (checked before any run starts).
    """
    own = {f.name for f in dataclasses.fields(SweepConfig)} - {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in config_values(cfg).items() if k not in own}
    out = Path(cfg.output)
    if cfg.ranks:
        runs = {f"r={r}": {"r": r} for r in cfg.ranks}
    else:
        runs = {m: {"method": m} for m in cfg.methods}
    # Building every TrainConfig first checks each value (e.g. an unknown method) before any run starts.
    return {label: build_config(TrainConfig, {**base, **change, "output": str(out / label.replace("=", ""))})
            for label, change in runs.items()}


def measure_run(run: TrainConfig) -> dict:
    """Train `run` in a fresh subprocess; return what the sweep compares (or the error if it failed).

    Returns:
        {"exact_match", "loss", "trainable_params", "adapter_bytes", "step_s" (median), "peak_rss_bytes",
         "peak_cuda_bytes", "wall_s", "before"} or {"error": the log's last line, "log": path}.
    """
    out = Path(run.output)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweep_train.log"
    started = time.perf_counter()
    with log.open("w") as stream:
        proc = subprocess.run(
            [sys.executable, "-m", "lorakit.tools.sweep", json.dumps(config_values(run)), str(out / RESULT_NAME)],
            stdout=stream, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
    if proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}", "log": str(log)}
    child = json.loads((out / RESULT_NAME).read_text())
    summary = child["summary"]
    steps = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "exact_match": summary["after"]["exact_match"], "loss": summary["after"]["loss"],
        "trainable_params": summary["trainable_params"],
        # every file the method saved (weights and config), whatever the method names them
        "adapter_bytes": sum(f.stat().st_size for f in (out / "adapter").rglob("*") if f.is_file()),
        "step_s": statistics.median(steps), "peak_rss_bytes": child["peak_rss_bytes"],
        "peak_cuda_bytes": child["peak_cuda_bytes"], "wall_s": time.perf_counter() - started,
        "before": summary["before"],
    }


def choose(results: dict[str, dict], metric: str, tolerance: float) -> tuple[str, str | None]:
    """The metric used and the cheapest run (fewest trainable parameters) within `tolerance` of the best.

    Args:
        results: {label: measure_run result}; failed runs are skipped.
        metric: "exact_match", "loss" or "auto" (exact match when every run measured it).
        tolerance: exact-match points (percent), or percent of the best loss.

    Returns:
        (metric, label), label None when no run succeeded.

    Raises:
        LorakitError: metric "exact_match" on runs that could not measure it (plain-text data).
    """
    done = {label: r for label, r in results.items() if "error" not in r}
    measured = all(r["exact_match"] is not None for r in done.values())
    if metric == "auto":
        metric = "exact_match" if measured else "loss"
    if metric == "exact_match" and not measured:
        raise LorakitError("--metric exact_match needs instruction or chat data (generation is compared with the "
                           "reference); use --metric loss for plain text.")
    if not done:
        return metric, None
    if metric == "exact_match":
        best = max(r["exact_match"] for r in done.values())
        good = [label for label, r in done.items() if r["exact_match"] >= best - tolerance / 100 - _SLACK]
    else:
        best = min(r["loss"] for r in done.values())
        good = [label for label, r in done.items() if r["loss"] <= best * (1 + tolerance / 100) + _SLACK]
    return metric, min(good, key=lambda label: done[label]["trainable_params"])


def sweep_table(results: dict[str, dict], vary: str, choice: str | None, metric: str, tolerance: float) -> str:
    """The Markdown table of a sweep, the chosen run marked."""
    head = "rank" if vary == "r" else "method"
    lines = [f"| {head} | trainable params | adapter size | held-out exact match | held-out loss | step time (s) "
             "| peak memory (MiB) | |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        name = label.removeprefix("r=")
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        em = f"{100 * r['exact_match']:.1f}%" if r["exact_match"] is not None else "-"
        memory = r["peak_cuda_bytes"] if r["peak_cuda_bytes"] is not None else r["peak_rss_bytes"]
        mark = "**smallest within tolerance**" if label == choice else ""
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['adapter_bytes'] / 2**20:.2f} MiB | {em} | "
                     f"{r['loss']:.4f} | {r['step_s']:.2f} | {memory / 2**20:,.0f} | {mark} |")
    unit = "exact-match points" if metric == "exact_match" else "percent of the best held-out loss"
    lines.append(f"\nMarked: the run with the fewest trainable parameters within the tolerance ({tolerance:g} {unit}) "
                 "of the best.")
    before = next((r["before"] for r in results.values() if "error" not in r), None)
    if before is not None:
        em = f"exact match {100 * before['exact_match']:.1f}%, " if before["exact_match"] is not None else ""
        lines.append(f"The base model before training: {em}held-out loss {before['loss']:.4f}.")
    return "\n".join(lines)


def plot_sweep(results: dict[str, dict], vary: str, choice: str | None, path: Path) -> None:
    """Quality, size, step time and peak memory against rank (log scale) or method; the chosen run starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {label: r for label, r in results.items() if "error" not in r}
    labels = list(done)
    xs = [int(label.removeprefix("r=")) for label in labels] if vary == "r" else list(range(len(labels)))
    memory = [(r["peak_cuda_bytes"] or r["peak_rss_bytes"]) / 2**20 for r in done.values()]
    panels = [
        ("held-out exact match (%)", [100 * (r["exact_match"] or 0) for r in done.values()]),
        ("held-out loss", [r["loss"] for r in done.values()]),
        ("trainable parameters", [r["trainable_params"] for r in done.values()]),
        ("adapter size (MiB)", [r["adapter_bytes"] / 2**20 for r in done.values()]),
        ("step time (s)", [r["step_s"] for r in done.values()]),
        ("peak memory (MiB)", memory),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, (title, ys) in zip(axes.flat, panels):
        ax.plot(xs, ys, "o-")
        if choice in done:
            i = labels.index(choice)
            ax.plot([xs[i]], [ys[i]], "*", color="tab:red", markersize=14)
        ax.set_title(title, fontsize=10)
        if vary == "r":
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("rank")
        else:
            ax.set_xticks(xs, labels, rotation=30, fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run_sweep(cfg: SweepConfig) -> dict:
    """`lorakit sweep`: train each value in its own process, then write sweep.json, sweep.md and sweep.png.

    Returns:
        The content of sweep.json: {"vary", "metric", "tolerance", "choice", "runs": {label: result}}.

    Raises:
        LorakitError: a bad sweep setting, or every run failed (the logs are named).
    """
    runs = run_configs(cfg)
    out = Path(cfg.output)
    vary = "r" if cfg.ranks else "method"
    results: dict[str, dict] = {}
    for i, (label, run) in enumerate(runs.items(), 1):
        print(f"[{i}/{len(runs)}] {label}: training in {run.output} ...", flush=True)
        results[label] = measure_run(run)
        r = results[label]
        print(f"    failed: {r['error']} (log: {r['log']})" if "error" in r else
              f"    done in {r['wall_s']:.0f} s: held-out loss {r['loss']:.4f}"
              + (f", exact match {100 * r['exact_match']:.1f}%" if r["exact_match"] is not None else ""), flush=True)
    metric, choice = choose(results, cfg.metric, cfg.tolerance)
    if choice is None:
        raise LorakitError(f"every run of the sweep failed; see the sweep_train.log files under {out}.")
    table = sweep_table(results, vary, choice, metric, cfg.tolerance)
    summary = {"vary": vary, "metric": metric, "tolerance": cfg.tolerance, "choice": choice, "runs": results}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "sweep.md", table + "\n")
    plot_sweep(results, vary, choice, out / "sweep.png")
    print("\n" + table + f"\n\nsweep: {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return summary


def _worker(run_json: str, result_path: str) -> None:
    """The subprocess of one run: train, then record the summary and this process's peak memory."""
    summary = train(build_config(TrainConfig, json.loads(run_json)))
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    atomic_write_text(result_path, json.dumps({"summary": summary, "peak_rss_bytes": peak_rss, "peak_cuda_bytes": peak_cuda}))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
