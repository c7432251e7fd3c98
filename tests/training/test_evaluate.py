"""Tests for lorakit.training.evaluate: exact match, and the one evaluation (`evaluate`, `lorakit eval`)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.training.data.sets import load_eval_set
from lorakit.training.evaluate import (
    EvalConfig,
    evaluate,
    exact_match,
    exact_match_rate,
    run_eval,
)
from lorakit.training.loading import load_with_adapter
from lorakit.training.loss import IGNORE_INDEX
from lorakit.training.models import load_model


def test_exact_match():
    assert exact_match("  ORDER x\n", "ORDER x")
    assert not exact_match("ORDER  x", "ORDER x")
    assert exact_match_rate(["a", " b ", "c"], ["a", "b", "d"]) == 2 / 3


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_loss_is_transformers_loss(tiny, task_files):
    """The held-out loss is the token mean of the cross-entropy transformers computes itself."""
    _, evals = task_files
    data = load_eval_set(evals, tiny.tokenizer)
    result = evaluate(tiny.model, tiny.tokenizer, data, torch.device("cpu"), exact_match_samples=0, probe=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in data.examples:
            labels = torch.tensor([example["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(tiny.model(torch.tensor([example["input_ids"]]), labels=labels).loss) * n
            count += n
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.n_examples == len(data.examples) == 8
    assert result.exact_match is None and result.probe_perplexity is None


def test_exact_match_and_probe(tiny, task_files):
    _, evals = task_files
    data = load_eval_set(evals, tiny.tokenizer)
    result = evaluate(tiny.model, tiny.tokenizer, data, torch.device("cpu"), exact_match_samples=3, max_new_tokens=4)
    assert result.exact_match == 0.0  # a random model does not write the order records
    assert [reference for reference, _ in result.samples] == [r["output"] for r in data.records[:3]]
    assert result.probe_perplexity > 1


def test_text_data_has_no_exact_match(tiny, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n")
    data = load_eval_set(path, tiny.tokenizer)
    assert data.format == "text"
    result = evaluate(tiny.model, tiny.tokenizer, data, torch.device("cpu"), probe=False)
    assert result.exact_match is None and result.loss > 0


def test_run_eval_prints_what_evaluate_measures(tiny_model_dir, task_files, capsys):
    _, evals = task_files
    out = run_eval(EvalConfig(data=str(evals), model=str(tiny_model_dir), eval_samples=2, max_new_tokens=4,
                              json=True, device="cpu"))
    assert json.loads(capsys.readouterr().out) == out
    loaded = load_with_adapter(str(tiny_model_dir), None, "cpu")  # the same compute dtype as run_eval's
    data = load_eval_set(evals, loaded.tokenizer)
    direct = evaluate(loaded.model, loaded.tokenizer, data, torch.device("cpu"), 2, 4)
    assert out["loss"] == pytest.approx(direct.loss, rel=1e-5)
    assert out["exact_match"] == direct.exact_match
    assert out["probe_perplexity"] == pytest.approx(direct.probe_perplexity, rel=1e-5)
