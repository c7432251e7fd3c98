"""--report-to tensorboard,mlflow: what a run logs, read back with TensorBoard's event reader and MLflow's client."""
import json

import pytest

from lorakit.cli.main import main
from lorakit.core.errors import LorakitError
from lorakit.training import tracking

FAST = ["--eval-samples", "4", "--max-new-tokens", "4", "--precision", "fp32", "--warmup-steps", "1"]


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, task_files, tmp_path_factory):
    train, evals = task_files
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        code = main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--eval-data", str(evals),
                     "--output", str(out), *FAST, "--max-steps", "3", "--batch-size", "4", "--eval-every", "2",
                     "--r", "4", "--report-to", "tensorboard,mlflow", "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def test_tensorboard_event_files_hold_the_run(tracked_run):
    out, rows = tracked_run
    got = scalars(out / "tensorboard")
    for key, tag in (("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_s", "train/tokens_per_s")):
        assert [s for s, _ in got[tag]] == [1, 2, 3]
        assert [v for _, v in got[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 in the file
    assert got["eval/loss"] == [(2, pytest.approx(rows[1]["eval_loss"], rel=1e-6))]
    summary = json.loads((out / "summary.json").read_text())
    for when in ("before", "after"):
        assert got[f"{when}/eval_loss"][0][1] == pytest.approx(summary[when]["loss"], rel=1e-6)
        assert got[f"{when}/forgetting_probe_perplexity"][0][1] == pytest.approx(
            summary[when]["probe_perplexity"], rel=1e-6)
        assert f"{when}/eval_exact_match" in got
    assert got["after/eval_loss"][0][0] == 3 and got["before/eval_loss"][0][0] == 0


def test_mlflow_file_store_holds_the_run(tracked_run):
    from mlflow.tracking import MlflowClient

    out, rows = tracked_run
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("lorakit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lora.r"] == "4" and run.data.params["report_to"] == '["tensorboard", "mlflow"]'
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/grad_norm")] == pytest.approx(
        [r["grad_norm"] for r in rows])
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["after/forgetting_probe_perplexity"] == pytest.approx(summary["after"]["probe_perplexity"])
    config = json.loads((out / "mlruns" / experiment.experiment_id / run.info.run_id / "artifacts" / "config.json")
                        .read_text())
    assert config["max_steps"] == 3 and config["report_to"] == ["tensorboard", "mlflow"]


def test_mlflow_honours_tracking_uri_and_marks_failed_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    trackers = tracking.make_trackers(["mlflow"], tmp_path / "run", run_name="broken")
    trackers.log_config({"methods": {"lora": {"r": 8}}, "lr": 1e-3})
    trackers.log_metrics({"train/loss": 2.5, "train/grad_norm": float("nan")}, step=1)
    trackers.close(failed=True)
    trackers.close()  # a second close (the loop's `finally`) changes nothing
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["methods.lora.r"] == "8"
    assert run.data.metrics == {"train/loss": 2.5}  # NaN is not sent


def test_report_to_errors():
    with pytest.raises(LorakitError, match="unknown tracker.*wandb.*tensorboard, mlflow"):
        tracking.check_report_to(["wandb"])
    with pytest.raises(LorakitError, match="cannot be combined"):
        tracking.check_report_to(["none", "mlflow"])
    tracking.check_report_to(["none"])
    assert tracking.make_trackers(["none"], None, "x").trackers == []


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[mlflow\]'"):
        tracking.check_report_to(["mlflow"])
