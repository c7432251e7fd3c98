"""Tests for lorakit.training.data.tokenize: examples with labels masked to the trained tokens."""
from __future__ import annotations

import copy

import pytest
from conftest import CHAT_RECORD, INSTRUCTION_RECORD, jsonl, write_file

from lorakit.core.errors import LorakitError
from lorakit.training.data.records import load_records
from lorakit.training.data.render import prompts_and_references
from lorakit.training.data.tokenize import tokenize_records
from lorakit.training.loss import IGNORE_INDEX


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])




@pytest.fixture
def tokenizer(smollm_tokenizer):
    """The embedded SmolLM2 tokenizer, with its ChatML template."""
    return smollm_tokenizer


@pytest.fixture
def plain_tokenizer(smollm_tokenizer_without_template):
    """The same tokenizer without a chat template, to exercise the Alpaca-style fallback."""
    return smollm_tokenizer_without_template


def test_instruction_masks_all_but_response(tokenizer):
    record = dict(INSTRUCTION_RECORD)
    [example] = tokenize_records([record], tokenizer, "instruction", 256)
    assert len(example["input_ids"]) == len(example["labels"])
    assert trained_text(tokenizer, example) == "5<|im_end|>\n"

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], add_generation_prompt=True, tokenize=False
    )
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(label != IGNORE_INDEX for label in example["labels"][n_prompt:])
    assert tokenizer.decode(example["input_ids"]) == prompt + "5<|im_end|>\n"


def test_chat_trains_every_assistant_turn(tokenizer):
    [example] = tokenize_records([CHAT_RECORD], tokenizer, "chat", 256)
    assert trained_text(tokenizer, example) == "Paris<|im_end|>\nRome<|im_end|>\n"
    full = tokenizer.apply_chat_template(CHAT_RECORD["messages"], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == full


def test_chat_drops_turns_after_last_assistant(tokenizer):
    record = {"messages": CHAT_RECORD["messages"] + [{"role": "user", "content": "Thanks"}]}
    [a] = tokenize_records([record], tokenizer, "chat", 256)
    [b] = tokenize_records([CHAT_RECORD], tokenizer, "chat", 256)
    assert a == b


def test_train_on_prompt_labels_everything(tokenizer):
    [example] = tokenize_records([INSTRUCTION_RECORD], tokenizer, "instruction", 256, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_fallback_template_without_chat_template(plain_tokenizer):
    [example] = tokenize_records([INSTRUCTION_RECORD], plain_tokenizer, "instruction", 256)
    text = plain_tokenizer.decode(example["input_ids"])
    assert text == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5<|im_end|>"
    assert trained_text(plain_tokenizer, example) == "5<|im_end|>"

    no_input = {**INSTRUCTION_RECORD, "input": ""}
    [example] = tokenize_records([no_input], plain_tokenizer, "instruction", 256)
    assert "### Input" not in plain_tokenizer.decode(example["input_ids"])

    [example] = tokenize_records([CHAT_RECORD], plain_tokenizer, "chat", 256)
    assert trained_text(plain_tokenizer, example) == "Paris<|im_end|>Rome<|im_end|>"
    assert plain_tokenizer.decode(example["input_ids"]).startswith("Be brief.\n\n### Instruction:\nCapital of France?")


def test_text_documents_are_chunked_not_truncated(tokenizer):
    words = " ".join(f"word{i}" for i in range(200))
    ids = tokenizer(words + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    examples = tokenize_records([{"text": words}], tokenizer, "text", 64)
    assert [len(e["input_ids"]) for e in examples[:-1]] == [64] * (len(examples) - 1)
    assert [t for e in examples for t in e["input_ids"]] == ids
    assert all(e["labels"] == e["input_ids"] for e in examples)


def test_too_long_sample_names_file_line(tokenizer, tmp_path):
    long = {"instruction": "Repeat.", "output": "la " * 100}
    path = write_file(tmp_path, "long.jsonl", jsonl(INSTRUCTION_RECORD, long))
    records, fmt = load_records(path)
    with pytest.raises(LorakitError, match=r"long\.jsonl:2: .*max_seq_len=64.*--max-seq-len.*--truncate"):
        tokenize_records(records, tokenizer, fmt, 64, source=path)
    with pytest.raises(LorakitError, match="record 2"):
        tokenize_records([INSTRUCTION_RECORD, long], tokenizer, fmt, 64)


def test_truncate_cuts_the_end(tokenizer):
    long = {"instruction": "Repeat.", "input": "", "output": "la " * 100}
    [full] = tokenize_records([long], tokenizer, "instruction", 1000)
    [cut] = tokenize_records([long], tokenizer, "instruction", 64, truncate=True)
    assert cut["input_ids"] == full["input_ids"][:64] and cut["labels"] == full["labels"][:64]


def test_truncate_drops_samples_with_no_response_left(tokenizer):
    examples = tokenize_records([INSTRUCTION_RECORD], tokenizer, "instruction", 10, truncate=True)
    assert examples == []


def test_chat_template_problems_name_the_record(tokenizer, tmp_path):
    path = write_file(tmp_path, "chat.jsonl", jsonl(CHAT_RECORD, CHAT_RECORD))
    records, fmt = load_records(path)
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(LorakitError, match=r"chat\.jsonl:1: .*rejects this conversation.*roles must alternate"):
        tokenize_records(records, strict, fmt, 256, source=path)
    # A template that renders only the last message in full rewrites earlier turns.
    strict.chat_template = "{% for m in messages %}{{ m.content if loop.last else '.' }}{% endfor %}"
    with pytest.raises(LorakitError, match=r"chat\.jsonl:1: .*differently once later turns follow"):
        tokenize_records(records, strict, fmt, 256, source=path)
    with pytest.raises(LorakitError, match=r"^line 1: "):
        prompts_and_references(records, strict, fmt)
