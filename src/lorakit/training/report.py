"""What a run shows: before/after measurements, metrics.jsonl, loss.png and report.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.core.fsutil import atomic_write_text
from lorakit.methods.combine import describe_methods
from lorakit.training.evaluate import EvalResult
from lorakit.training.knowledge import BehaviourKept, compare_behaviour


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after: int = 0) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if truncate_after and path.exists():
            kept = [line for line in path.read_text(errors="replace").splitlines()
                    if (record := _record(line)) is not None and record.get("step", 0) <= truncate_after]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _record(line: str) -> dict | None:
    """One metrics line as a dict; None for a line torn by a kill mid-write (or anything else unreadable)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0), int) else None


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}"


def comparison_table(before: EvalResult, after: EvalResult, kept: BehaviourKept | None = None) -> str:
    """A Markdown table of before vs after (with the behaviour probe's rows when `kept` is given)."""
    rows = [
        ("held-out loss", before.loss, after.loss, False),
        ("held-out perplexity", before.perplexity, after.perplexity, False),
        ("held-out exact match", before.exact_match, after.exact_match, True),
        ("forgetting probe perplexity (stdlib docstrings)", before.probe_perplexity, after.probe_perplexity, False),
    ]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for name, b, a, pct in rows:
        if b is None or a is None:
            continue
        change = f"{100 * (a - b):+.1f} points" if pct else f"{100 * (a - b) / b:+.1f}%"
        lines.append(f"| {name} | {_fmt(b, pct)} | {_fmt(a, pct)} | {change} |")
    if kept is not None:
        lines.append(f"| general answers unchanged (behaviour probe, {kept.n_prompts} instructions) | 100.0% | "
                     f"{100 * kept.unchanged:.1f}% | {100 * (kept.unchanged - 1):+.1f} points |")
        lines.append(f"| general answers, token agreement | 100.0% | {100 * kept.token_agreement:.1f}% | "
                     f"{100 * (kept.token_agreement - 1):+.1f} points |")
    return "\n".join(lines)


def knowledge_section(kept: BehaviourKept | None, guard_note: str | None) -> list[str]:
    """report.md's lines on what was kept: the guard's choice and a few general answers side by side."""
    lines = ["## Knowledge kept", ""]
    if guard_note:
        lines += [f"Forgetting guard: {guard_note}", ""]
    if kept is not None:
        lines += ["| instruction | before | after |", "|---|---|---|"]
        cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += [f"| {cell(q)} | {cell(b)} | {cell(a)} |" for q, b, a in kept.examples]
        lines.append("")
    return lines if len(lines) > 2 else []


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)


def write_run_report(out: Path, cfg, before: EvalResult, after: EvalResult, counts, steps: int,
                     tokens_per_s: float | None, wall_s: float, world_size: int, tokenizer: Any = None,
                     guard_note: str | None = None) -> dict[str, Any]:
    """Write report.md and loss.png, print the table, and return the run's summary.

    Args:
        tokenizer: for the behaviour probe's token agreement (both results must hold behaviour answers).
        guard_note: what the forgetting guard kept and why (--max-forgetting), or None.
    """
    kept = None
    if tokenizer is not None and before.behaviour_answers is not None and after.behaviour_answers is not None:
        kept = compare_behaviour(before.behaviour_answers, after.behaviour_answers, tokenizer)
    table = comparison_table(before, after, kept)
    samples = "\n".join(f"- reference: `{ref}`\n  generated: `{gen}`" for ref, gen in getattr(after, "samples", []))
    text = "\n".join([
        f"# lorakit run: {out.name}", "",
        f"- base model: `{cfg.model or 'default'}`; data: `{cfg.data or 'built-in ' + cfg.task + ' task'}`",
        *[f"- {name}: " + ", ".join(f"{k}={v}" for k, v in rows) for name, rows in describe_methods(out / "adapter")],
        f"- trainable parameters: {counts.trainable_params:,} of {counts.total_params:,} "
        f"({counts.trainable_percent:.2f}%)",
        f"- steps: {steps}, processes: {world_size}, training throughput: "
        f"{tokens_per_s:.0f} tokens/s" if tokens_per_s else f"- steps: {steps}",
        f"- wall time (load, evaluate, train, evaluate): {wall_s:.0f} s", "",
        "## Before vs after", "", table, "",
        "The forgetting probe is perplexity on English text that is not in the training data; "
        "a small change means the pretrained knowledge was kept. The behaviour probe asks general "
        "instructions (facts, arithmetic, short writing) and counts the greedy answers left unchanged.", "",
    ] + knowledge_section(kept, guard_note) + (["## Sample generations (after)", "", samples, ""] if samples else []))
    atomic_write_text(out / "report.md", text)
    if (out / "metrics.jsonl").exists():
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    print("\n" + table + f"\n\nreport: {out / 'report.md'}")
    summary = {"before": before.to_dict(), "after": after.to_dict(), "trainable_params": counts.trainable_params,
               "total_params": counts.total_params, "steps": steps, "tokens_per_s": tokens_per_s, "wall_s": wall_s,
               "knowledge": {"behaviour": kept.to_dict() if kept else None, "guard": guard_note}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
