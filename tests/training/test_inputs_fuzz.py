"""Fuzzing what `lorakit train` reads besides the model: data rows in every format, YAML configs, and the
checkpoint directories `--resume` reads. Each case works or ends in LorakitError naming the problem."""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHAT_RECORD, INSTRUCTION_RECORD, randomize_lora, tiny_llama
from fuzzing import JSON_VALUES, deeply_nested, mutated_bytes, mutated_json_object
from hypothesis import given
from hypothesis import strategies as st

import lorakit
from lorakit.training import checkpoint
from lorakit.training.config import TrainConfig
from lorakit.training.config_file import config_to_yaml, load_config
from lorakit.training.data.sources import DataOptions, parse_columns, read_records
from lorakit.training.data.tokenize import tokenize_records

# ---- data rows ----------------------------------------------------------------------------------------
TEXT_RECORD = {"text": "The quick brown fox jumps over the lazy dog."}
RECORD_FIELDS = ["instruction", "input", "output", "messages", "text", "conversations", "system", "tools", "role",
                 "content"]


@st.composite
def rows(draw) -> list[dict]:
    """A few valid records of one kind, some with fields removed, retyped or added (messages too)."""
    base = draw(st.sampled_from([INSTRUCTION_RECORD, CHAT_RECORD, TEXT_RECORD]))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        row = json.loads(json.dumps(base))
        if draw(st.booleans()):
            row = json.loads(draw(mutated_json_object(row, RECORD_FIELDS)))
        if "messages" in row and isinstance(row["messages"], list) and row["messages"] and draw(st.booleans()):
            i = draw(st.integers(0, len(row["messages"]) - 1))
            if isinstance(row["messages"][i], dict):
                row["messages"][i] = json.loads(draw(mutated_json_object(row["messages"][i],
                                                                         ["role", "content", "tool_calls", "name"])))
        out.append(row)
    return out


def as_csv(records: list[dict]) -> bytes:
    fields = sorted({k for r in records for k in r})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields or ["text"])
    writer.writeheader()
    for r in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buffer.getvalue().encode()


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(file suffix, bytes): JSONL, CSV or text, serialized from fuzzed rows, maybe then byte-mutated."""
    records = draw(rows())
    suffix = draw(st.sampled_from([".jsonl", ".csv", ".txt"]))
    if suffix == ".jsonl":
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
    elif suffix == ".csv":
        data = as_csv(records)
    else:
        data = "\n\n".join(str(r.get("text", r)) for r in records).encode()
    kind = draw(st.sampled_from(["as is", "bytes", "nested line"]))
    if kind == "bytes":
        data = draw(mutated_bytes(data))
    elif kind == "nested line":
        data += deeply_nested(draw(st.integers(500, 50_000))) + b"\n"
    return suffix, data


# --columns values: mappings of lorakit's fields to the data's columns, valid, clashing or malformed
COLUMNS = st.lists(st.sampled_from(["output=answer", "instruction=text", "text=instruction", "messages=output",
                                    "output=output", "=x", "output=", "nonsense", "text=text", "input=missing"]),
                   max_size=3)


DATA_CASES = st.tuples(data_files(), st.sampled_from([None, "instruction", "chat", "text", "sharegpt"]),
                       st.integers(0, 3), st.booleans(), COLUMNS, st.booleans())


def read_and_tokenize(case, tokenizer) -> None:
    """Read the file as `lorakit train` does (in memory, or --streaming up to the first batch) and tokenize."""
    (suffix, data), format, max_samples, train_on_prompt, columns, streaming = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(data)
        try:
            if streaming:
                first_streamed_batch(path, format, columns, train_on_prompt, tokenizer)
                return
            records, fmt = read_records(str(path), format, DataOptions(columns=parse_columns(columns),
                                                                       max_samples=max_samples))
            tokenize_records(records, tokenizer, fmt, 64, truncate=True, train_on_prompt=train_on_prompt,
                             source=path)
        except lorakit.LorakitError:
            pass


def first_streamed_batch(path, format, columns, train_on_prompt, tokenizer) -> None:
    from lorakit.training.data.stream import open_stream

    cfg = TrainConfig(data=str(path), format=format or "auto", columns=columns, streaming=True, max_steps=1,
                      batch_size=1, eval_samples=1, max_seq_len=64, train_on_prompt=train_on_prompt)
    _, batches, _, _ = open_stream(cfg, tokenizer)
    (micro,) = batches.micro_batches(0, 0)
    assert len(micro) == 1 and micro[0]["input_ids"]


@given(DATA_CASES)
def test_fuzz_data_rows(smollm_tokenizer, case):
    read_and_tokenize(case, smollm_tokenizer)


# ---- YAML configs -------------------------------------------------------------------------------------
VALID_YAML = config_to_yaml(TrainConfig(max_steps=3))
YAML_FIELDS = list(yaml.safe_load(VALID_YAML))
YAML_SPECIALS = [
    "a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
    "r: [*c, *c, *c, *c, *c, *c, *c, *c]\n",                  # alias expansion (a 'billion laughs' in small)
    "r: !!python/object/apply:os.system ['true']\n",           # a tag safe_load refuses
    "r: " + "[" * 5000 + "]" * 5000 + "\n",                     # deep nesting
    "lr: .nan\n", "r: .inf\n", "max_steps: 99999999999999999999999\n", "epochs: -1e309\n",
    "? [1, 2]\n: x\n",                                          # a non-string key
]


@st.composite
def yaml_files(draw) -> bytes:
    kind = draw(st.sampled_from(["values", "bytes", "special"]))
    if kind == "special":
        return draw(st.sampled_from(YAML_SPECIALS)).encode()
    if kind == "bytes":
        return draw(mutated_bytes(VALID_YAML.encode()))
    data = yaml.safe_load(VALID_YAML)
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.sampled_from(YAML_FIELDS))] = draw(JSON_VALUES)
    return yaml.safe_dump(data).encode()


def load_yaml(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(data)
        try:
            load_config(TrainConfig, path)
        except lorakit.LorakitError:
            pass


@given(yaml_files())
def test_fuzz_yaml_config(data):
    load_yaml(data)


# ---- checkpoint directories for --resume ---------------------------------------------------------------
def lora_run():
    """A tiny LoRA model (B != 0) with AdamW moments after one step, and its scheduler."""
    model = tiny_llama()
    lorakit.apply(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.tensor([[1, 2, 3]])).logits.square().mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def valid_checkpoint() -> dict[str, bytes]:
    model, optimizer, scheduler = lora_run()
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save_checkpoint(Path(d), 2, model, lambda p: lorakit.save_adapter(model, p), optimizer, scheduler,
                                   {"loss": 1.0})
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


VALID_CHECKPOINT = valid_checkpoint()
STATE = "step-00000002/trainer_state.json"


@st.composite
def checkpoint_dirs(draw) -> tuple[dict[str, bytes], bool]:
    """The checkpoint's files with one changed; `resign`: checksums.json rewritten to match (a checkpoint that
    is consistent on disk but holds wrong content)."""
    files = dict(VALID_CHECKPOINT)
    name = draw(st.sampled_from(sorted(files)))
    if name == STATE and draw(st.booleans()):
        files[name] = draw(mutated_json_object(json.loads(files[name]), ["step", "optimizer", "scheduler", "loss"]))
    elif draw(st.integers(0, 9)) == 0:
        del files[name]
    else:
        files[name] = draw(mutated_bytes(files[name]))
    return files, draw(st.booleans())


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write a checkpoint directory's files under `root`; returns its step-00000002 directory."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root / "step-00000002"


def resume_from(case) -> None:
    files, resign = case
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        step = write_files(root, files)
        if resign and step.is_dir():
            (step / checkpoint.CHECKSUMS).write_text(json.dumps(checkpoint.file_checksums(step)))
        path, notes = checkpoint.resumable_checkpoint(root)
        assert path is not None or notes or not step.is_dir() or not files
        if path is None:
            return
        try:
            checkpoint.load_checkpoint(path, *lora_run())
        except lorakit.LorakitError:
            pass


@given(checkpoint_dirs())
def test_fuzz_checkpoint_dirs(case):
    resume_from(case)


def test_unchanged_checkpoint_loads():
    model, optimizer, scheduler = lora_run()
    with tempfile.TemporaryDirectory() as d:
        for name, data in VALID_CHECKPOINT.items():
            (Path(d) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / name).write_bytes(data)
        path, notes = checkpoint.resumable_checkpoint(Path(d))
        assert path.name == "step-00000002" and notes == []
        assert checkpoint.load_checkpoint(path, model, optimizer, scheduler)["step"] == 2


# ---- regressions: each ended in another exception before (found by the fuzzing above) -------------------
@pytest.mark.parametrize("suffix, data, message", [
    (".jsonl", b"", "holds no rows"),                                         # was: RuntimeError (StopIteration)
    (".txt", b"caf\xe9 au lait\n", "not UTF-8"),                             # was: UnicodeDecodeError
    (".jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),                      # was: UnicodeDecodeError
    (".jsonl", b'{"text": "a"}\n' + deeply_nested(50_000) + b"\n", "invalid JSON"),  # was: RecursionError
])
def test_bad_data_files_are_refused_by_name(suffix, data, message, smollm_tokenizer, tmp_path):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    with pytest.raises(lorakit.LorakitError, match=message):
        read_records(str(path), None, DataOptions())


@pytest.mark.parametrize("tools", [[None], "[1]", [{"type": "function"}, 3]])
def test_tools_that_are_not_schemas_are_refused(tools, smollm_tokenizer, tmp_path):  # was: ValueError (transformers)
    row = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
           "tools": tools}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(lorakit.LorakitError, match="'tools' must be a list of JSON objects"):
        records, fmt = read_records(str(path), None, DataOptions())
        tokenize_records(records, smollm_tokenizer, fmt, 64, truncate=True, train_on_prompt=False, source=path)


def test_deeply_nested_yaml_is_refused(tmp_path):  # was: RecursionError
    path = tmp_path / "c.yaml"
    path.write_text("r: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(lorakit.LorakitError, match="nests lists or mappings too deeply"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("change", [
    {"latest": b"[" * 5000},                                                   # was: OSError file name too long
    {STATE: json.dumps({"step": 2, "loss": 1.0, "scheduler": {}}).encode()},   # was: KeyError 'optimizer'
    {STATE: json.dumps({**json.loads(VALID_CHECKPOINT[STATE]), "scheduler": None}).encode()},  # was: AttributeError
], ids=["pointer garbage", "optimizer missing", "scheduler null"])
def test_inconsistent_checkpoints_are_refused(change):
    files = {**VALID_CHECKPOINT, **change}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        step = write_files(root, files)
        (step / checkpoint.CHECKSUMS).write_text(json.dumps(checkpoint.file_checksums(step)))  # consistent on disk
        path, notes = checkpoint.resumable_checkpoint(root)
        assert path == step
        if "latest" in change:
            assert "is corrupt" in notes[0]
            return
        with pytest.raises(lorakit.LorakitError, match="inconsistent trainer state"):
            checkpoint.load_checkpoint(path, *lora_run())


EXPLORE_TARGETS = {"yaml": (yaml_files(), load_yaml), "checkpoint": (checkpoint_dirs(), resume_from)}
