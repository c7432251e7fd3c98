"""Experiment tracking: a run's metrics, held-out results and config, sent to TensorBoard and MLflow through
their own writers (`--report-to tensorboard,mlflow`; the default `none` keeps metrics.jsonl and loss.png only).

    trackers = make_trackers(["tensorboard", "mlflow"], run_dir, run_name="demo")
    trackers.log_config({"r": 8, "lr": 2e-4, ...})            # TensorBoard: a text summary; MLflow: params + config.json
    trackers.log_metrics({"train/loss": 1.93, "train/learning_rate": 2e-4}, step=10)
    trackers.close()                                          # MLflow: the run ends FINISHED (close(failed=True): FAILED)

Where they write: TensorBoard event files in `<run>/tensorboard/` (`tensorboard --logdir <run>/tensorboard`);
MLflow to $MLFLOW_TRACKING_URI when set (a server, sqlite:///mlflow.db, ...), else to the local file store
`<run>/mlruns`, experiment "lorakit". Each library is imported only when its tracker is asked for.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from lorakit.core.errors import LorakitError

# --report-to name -> (module that must be importable, pip extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
NONE = "none"

# A training record of the loop (metrics.jsonl keys) -> the metric name the trackers get.
TRAIN_METRICS = {
    "loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s", "step_s": "train/step_s", "epoch": "train/epoch", "eval_loss": "eval/loss",
    "forgetting_pct": "eval/forgetting_pct", "probe_eval_loss": "eval/probe_loss",  # --max-forgetting's probes
}
# An EvalResult field -> its metric name under before/ and after/.
EVAL_METRICS = {
    "loss": "eval_loss", "perplexity": "eval_perplexity", "exact_match": "eval_exact_match",
    "probe_perplexity": "forgetting_probe_perplexity",
}
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow keeps of one param value


class Tracker(Protocol):
    """Where a run's numbers go, besides metrics.jsonl."""

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run's configuration (nested dicts allowed) once, at the start."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics (name -> value) at an optimizer step."""

    def close(self, failed: bool = False) -> None:
        """Flush and end the run; `failed` marks it failed where the backend has such a state."""


def check_report_to(names: list[str]) -> None:
    """Check `--report-to` names before any work starts.

    Args:
        names: tracker names: tensorboard, mlflow, or none alone.

    Raises:
        LorakitError: an unknown name, `none` mixed with others, or a tracker whose library is not installed.
    """
    unknown = [n for n in names if n not in REQUIREMENTS and n != NONE]
    if unknown:
        raise LorakitError(f"--report-to: unknown tracker(s) {', '.join(unknown)}; "
                           f"use {', '.join(REQUIREMENTS)} (comma-separated) or {NONE}.")
    if NONE in names and len(names) > 1:
        raise LorakitError(f"--report-to: '{NONE}' cannot be combined with other trackers; drop one of them.")
    for name in names:
        if name in REQUIREMENTS and importlib.util.find_spec(REQUIREMENTS[name][0]) is None:
            raise LorakitError(f"--report-to {name} needs the {REQUIREMENTS[name][0]} package, which is not "
                               f"installed; run `pip install 'lorakit[{REQUIREMENTS[name][1]}]'`.")


class Trackers:
    """Several trackers behind one Tracker: each call goes to all of them, in order."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.closed = False

    def log_config(self, config: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if finite:
            for tracker in self.trackers:
                tracker.log_metrics(finite, step)

    def close(self, failed: bool = False) -> None:
        """End every tracker once; later calls do nothing (so a run can close on error and in `finally`)."""
        if not self.closed:
            self.closed = True
            for tracker in self.trackers:
                tracker.close(failed)


def make_trackers(names: list[str], run_dir: Path, run_name: str) -> Trackers:
    """Open the trackers named by `--report-to`.

    Args:
        names: tracker names (see `check_report_to`); `["none"]` or `[]` gives no tracker.
        run_dir: the run directory; TensorBoard writes to `run_dir/tensorboard`, MLflow's default store is
            `run_dir/mlruns`.
        run_name: the run's name in MLflow.

    Returns:
        One Trackers object over all of them.

    Raises:
        LorakitError: as `check_report_to`, or MLflow cannot open its tracking store.
    """
    check_report_to(names)
    openers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: TensorBoardTracker(run_dir / "tensorboard"),
        "mlflow": lambda: MlflowTracker(os.environ.get("MLFLOW_TRACKING_URI") or None, run_dir / "mlruns", run_name),
    }
    return Trackers([openers[name]() for name in names if name != NONE])


def train_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The trackers' metrics of one training record (a metrics.jsonl line): train/loss, eval/loss, ..."""
    return {TRAIN_METRICS[key]: value for key, value in record.items() if key in TRAIN_METRICS}


def eval_metrics(result: dict[str, Any], when: str) -> dict[str, float]:
    """The trackers' metrics of a before/after measurement (`EvalResult.to_dict()`), prefixed `when/`."""
    return {f"{when}/{name}": result[key] for key, name in EVAL_METRICS.items() if result.get(key) is not None}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"group.option": "value"}; lists and other values as JSON."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TensorBoardTracker:
    """Scalars and the config as text, through torch's SummaryWriter (TensorBoard's event-file format)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_config(self, config: dict[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in flatten(config).items())
        self.writer.add_text("config", "| option | value |\n|---|---|\n" + table, global_step=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    """Params, metrics and config.json in one MLflow run, through MlflowClient (no global active run, so a
    caller's own `mlflow.start_run()` is left alone)."""

    def __init__(self, tracking_uri: str | None, default_store: Path, run_name: str,
                 experiment: str = "lorakit") -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if tracking_uri is None:
            tracking_uri = default_store.resolve().as_uri()
            # MLflow 3 keeps its file store in maintenance mode and asks for this opt-in to use it; it is
            # the only store that needs no server or database, so the default run-local store takes it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except MlflowException as error:
            raise LorakitError(f"--report-to mlflow: cannot open the tracking store {tracking_uri} ({error.message}); "
                               "set MLFLOW_TRACKING_URI to a reachable server or database, or unset it to log "
                               "into the run directory.") from error
        self.tracking_uri = tracking_uri

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:MLFLOW_PARAM_LIMIT]) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
