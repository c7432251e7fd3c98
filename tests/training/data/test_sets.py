"""Tests for lorakit.training.data.sets: a run's training and held-out sets, an evaluation set."""
from __future__ import annotations

from lorakit.training.config import TrainConfig
from lorakit.training.data.records import load_records
from lorakit.training.data.sets import load_datasets, load_eval_set
from lorakit.training.tasks import builtin_task


def test_eval_set_of_the_builtin_task(smollm_tokenizer):
    data = load_eval_set(None, smollm_tokenizer, builtin_samples=5)
    assert data.format == "instruction" and data.records == builtin_task(n_eval=5)[1]
    assert len(data.examples) == 5


def test_long_eval_samples_are_cut_not_refused(smollm_tokenizer, task_files):
    _, evals = task_files
    data = load_eval_set(evals, smollm_tokenizer, max_seq_len=16)
    assert len(data.records) == 8 and all(len(e["input_ids"]) <= 16 for e in data.examples)


def test_datasets_hold_out_a_split_or_the_eval_file(smollm_tokenizer, task_files):
    train, evals = task_files
    split = load_datasets(TrainConfig(data=str(train), eval_fraction=0.25), smollm_tokenizer)
    assert (len(split.train), len(split.eval.records)) == (36, 12)
    given = load_datasets(TrainConfig(data=str(train), eval_data=str(evals)), smollm_tokenizer)
    # read through `datasets`, each record names its row ("_at") where load_records names its line ("_line")
    fields = [[{k: v for k, v in r.items() if k not in ("_at", "_line")} for r in rs]
              for rs in (given.eval.records, load_records(evals)[0])]
    assert len(given.train) == 48 and fields[0] == fields[1] and given.eval.records[1]["_at"] == f"{evals}:row 2"
    packed = load_datasets(TrainConfig(data=str(train), eval_data=str(evals), packing=True, max_seq_len=256),
                           smollm_tokenizer)
    assert all(len(e["input_ids"]) == 256 for e in packed.train[:-1])
