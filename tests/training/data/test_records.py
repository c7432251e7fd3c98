"""Tests for lorakit.training.data.records: reading and validating files, holding out a split."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CHAT_RECORD, jsonl, write_file

from lorakit.core.errors import LorakitError
from lorakit.training.data.records import load_records, record_location, split_heldout


def test_import_does_not_load_transformers():
    modules = ", ".join(f"lorakit.training.data.{m}" for m in ("records", "render", "tokenize", "batching"))
    code = f"import sys, {modules}, lorakit.training.tasks; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jsonl_formats_detected_with_blank_lines(tmp_path):
    path = write_file(tmp_path, "a.jsonl", "\n" + jsonl({"text": "hello"}) + "\n" + jsonl({"text": "world"}))
    records, fmt = load_records(path)
    assert fmt == "text"
    assert [(r["text"], r["_line"]) for r in records] == [("hello", 2), ("world", 4)]

    records, fmt = load_records(write_file(tmp_path, "b.jsonl", jsonl({"instruction": "Hi", "output": "Yo"})))
    assert fmt == "instruction"
    assert records == [{"instruction": "Hi", "input": "", "output": "Yo", "_line": 1}]

    records, fmt = load_records(write_file(tmp_path, "c.jsonl", jsonl(CHAT_RECORD)))
    assert fmt == "chat" and records[0]["messages"] == CHAT_RECORD["messages"]


def test_csv_formats(tmp_path):
    path = write_file(tmp_path, "a.csv", 'instruction,input,output\nAdd,"1, 2",3\n\n"Say\nhi",,hi\n')
    records, fmt = load_records(path)
    assert fmt == "instruction"
    assert [(r["instruction"], r["input"], r["output"], r["_line"]) for r in records] == [
        ("Add", "1, 2", "3", 2),
        ("Say\nhi", "", "hi", 4),
    ]

    records, fmt = load_records(write_file(tmp_path, "b.csv", "text\nfirst doc\nsecond doc\n"))
    assert fmt == "text" and [r["text"] for r in records] == ["first doc", "second doc"]

    cell = json.dumps(CHAT_RECORD["messages"]).replace('"', '""')
    records, fmt = load_records(write_file(tmp_path, "c.csv", f'messages\n"{cell}"\n'))
    assert fmt == "chat" and records[0]["messages"] == CHAT_RECORD["messages"]


def test_txt_splits_documents_on_blank_lines(tmp_path):
    path = write_file(tmp_path, "a.txt", "First line\nstill first\n\n\nSecond doc\n   \nThird\n")
    records, fmt = load_records(path)
    assert fmt == "text"
    assert [(r["text"], r["_line"]) for r in records] == [
        ("First line\nstill first", 1),
        ("Second doc", 5),
        ("Third", 7),
    ]


def test_explicit_format_overrides_detection(tmp_path):
    path = write_file(tmp_path, "a.jsonl", jsonl({"text": "x", "instruction": "Do", "output": "it"}))
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
        (jsonl(CHAT_RECORD, {"messages": [{"role": "bot", "content": "x"}]}), None, "unknown role 'bot'"),
        (jsonl(CHAT_RECORD, {"messages": [{"role": "user", "content": "x"}]}), None, "no assistant message"),
        (jsonl(CHAT_RECORD, {"messages": "hi"}), None, "non-empty list"),
        (jsonl(CHAT_RECORD, {"messages": [{"role": "assistant", "content": ""}]}), None, "'content' is empty"),
        (jsonl({"text": "a"}, {"prompt": "b"}), "text", "missing field 'text'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, fmt, problem):
    path = write_file(tmp_path, "bad.jsonl", content)
    with pytest.raises(LorakitError, match=r"bad\.jsonl:2") as info:
        load_records(path, fmt)
    assert problem in str(info.value)


def test_csv_error_names_line(tmp_path):
    path = write_file(tmp_path, "bad.csv", "instruction,output\na,b\n\nc,\n")
    with pytest.raises(LorakitError, match=r"bad\.csv:4: field 'output' is empty"):
        load_records(path)


def test_undetectable_format_names_line(tmp_path):
    path = write_file(tmp_path, "bad.jsonl", "\n" + jsonl({"prompt": "x"}))
    with pytest.raises(LorakitError, match=r"bad\.jsonl:2: cannot detect the data format"):
        load_records(path)


def test_file_errors(tmp_path):
    with pytest.raises(LorakitError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(LorakitError, match="unsupported file extension"):
        load_records(write_file(tmp_path, "data.parquet", ""))
    with pytest.raises(LorakitError, match="no records"):
        load_records(write_file(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(LorakitError, match="Unknown data format"):
        load_records(write_file(tmp_path, "a.jsonl", jsonl({"text": "x"})), "alpaca")
    with pytest.raises(LorakitError, match="format is 'text'"):
        load_records(write_file(tmp_path, "a.txt", "x\n"), "chat")


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


def test_record_location():
    assert record_location({"_line": 7}, 0, "d.jsonl") == "d.jsonl:7"
    assert record_location({"_line": 7}, 0, None) == "line 7"
    assert record_location({}, 2, "d.jsonl") == "d.jsonl: record 3"
    assert record_location({}, 2, None) == "record 3"
