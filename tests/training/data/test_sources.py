"""--data through `datasets`: every input form, --split, --columns, --max-samples, and row errors that name file:row."""
import json
import shutil

import pytest

from conftest import put_in_hub_cache
from lorakit.core.errors import LorakitError
from lorakit.training.data.sources import DataOptions, parse_columns, read_records

ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i:03d}"} for i in range(6)]
EXPECTED = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in ROWS]
MAP = DataOptions(columns={"instruction": "question", "output": "answer"})


def plain(records):
    return [{k: v for k, v in r.items() if k != "_at"} for r in records]


def write_form(form: str, folder, hub_cache):
    """ROWS written as `form`; returns the --data spec and the split to read."""
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    jsonl = "".join(json.dumps(r) + "\n" for r in ROWS)
    if form == "jsonl":
        (folder / "d.jsonl").write_text(jsonl)
        return str(folder / "d.jsonl"), "train"
    if form == "json-array":
        (folder / "d.json").write_text(json.dumps(ROWS))
        return str(folder / "d.json"), "train"
    if form == "csv":
        (folder / "d.csv").write_text("question,answer\n" + "".join(f'"{r["question"]}",{r["answer"]}\n' for r in ROWS))
        return str(folder / "d.csv"), "train"
    if form == "parquet":
        ds.to_parquet(str(folder / "d.parquet"))
        return str(folder / "d.parquet"), "train"
    if form == "arrow":
        ds.save_to_disk(str(folder / "saved"))
        (arrow,) = (folder / "saved").glob("*.arrow")
        return str(arrow), "train"
    if form == "glob":
        (folder / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
        (folder / "part-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[4:]))
        return str(folder / "part-*.jsonl"), "train"
    if form == "save_to_disk":
        datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:1]), test=ds).save_to_disk(str(folder / "dd"))
        return str(folder / "dd"), "test"
    if form == "data-folder":
        (folder / "repo" / "data").mkdir(parents=True)
        ds.to_parquet(str(folder / "repo" / "data" / "train-00000-of-00001.parquet"))
        return str(folder / "repo"), "train"
    if form == "hub-cache-name":
        (folder / "repo" / "data").mkdir(parents=True)
        ds.to_parquet(str(folder / "repo" / "data" / "train-00000-of-00001.parquet"))
        (folder / "repo" / "README.md").write_text("---\nlicense: mit\n---\n")
        put_in_hub_cache(hub_cache, "lorakit-tests/sums", folder / "repo", repo_type="dataset")
        return "lorakit-tests/sums", "train"
    raise AssertionError(form)


FORMS = ["jsonl", "json-array", "csv", "parquet", "arrow", "glob", "save_to_disk", "data-folder", "hub-cache-name"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_the_same_records(form, tmp_path, hub_cache):
    spec, split = write_form(form, tmp_path, hub_cache)
    records, fmt = read_records(spec, None, DataOptions(split=split, columns=MAP.columns))
    assert fmt == "instruction" and plain(records) == EXPECTED  # CSV's "000" stays text
    assert records[4]["_at"].endswith(":row 1" if form == "glob" else ":row 5")


def test_dataset_name_from_datasets_own_cache(tmp_path, monkeypatch):
    """A dataset `datasets` prepared once (Arrow files under HF_DATASETS_CACHE/<name>/...) reads offline by name."""
    import datasets

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    source = tmp_path / "sums"
    (source / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS).to_parquet(str(source / "data" / "test-00000-of-00001.parquet"))
    datasets.load_dataset(str(source), cache_dir=str(cache))  # prepares cache/sums/default/0.0.0/<hash>/
    shutil.rmtree(source)
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1, as the CLI does
    records, _ = read_records("sums", None, DataOptions(split="test", columns=MAP.columns))
    assert plain(records) == EXPECTED and records[0]["_at"] == "sums[test]:row 1"


def test_absent_name_names_both_caches(hub_cache):
    with pytest.raises(LorakitError, match=rf"Hugging Face caches \({hub_cache}, .*hf download org/absent"):
        read_records("org/absent", None, DataOptions())


def test_max_samples_and_split_errors(tmp_path, hub_cache):
    spec, _ = write_form("glob", tmp_path, hub_cache)
    records, _ = read_records(spec, None, DataOptions(columns=MAP.columns, max_samples=5))
    assert plain(records) == EXPECTED[:5]
    spec, _ = write_form("save_to_disk", tmp_path, hub_cache)
    with pytest.raises(LorakitError, match="no split 'validation'; it has train, test"):
        read_records(spec, None, DataOptions(split="validation"))


def test_column_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(LorakitError, match=r"d.jsonl:row 1: --columns maps output=reply, but the data has no column "
                                           r"'reply'; its columns are answer, question"):
        read_records(str(tmp_path / "d.jsonl"), None, DataOptions(columns={"output": "reply"}))
    with pytest.raises(LorakitError, match="'output' is not field=column"):
        parse_columns(["output"])
    assert parse_columns(["output=answer", " instruction = question "]) == MAP.columns


def test_row_errors_name_file_and_row(tmp_path):
    import datasets

    rows = [dict(r) for r in ROWS]
    rows[2]["answer"] = "  "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(LorakitError, match=r"d.parquet:row 3: field 'output' is empty"):
        read_records(str(tmp_path / "d.parquet"), None, MAP)


def test_unparsable_json_lines_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n\n" + '{"text": "b"\n')
    with pytest.raises(LorakitError, match=r"bad.jsonl:3: invalid JSON"):
        read_records(str(bad), None, DataOptions())
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"instruction": "q", "output": o}) + "\n" for o in ["1", "2", 3, "4"]))
    with pytest.raises(LorakitError, match=r"mixed.jsonl:3: field 'output' must be a string, got int"):
        read_records(str(mixed), None, DataOptions())


def test_missing_inputs(tmp_path):
    with pytest.raises(LorakitError, match="the pattern matches no file"):
        read_records(str(tmp_path / "*.parquet"), None, DataOptions())
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(LorakitError, match="unsupported file extension '.xlsx'"):
        read_records(str(tmp_path / "d.xlsx"), None, DataOptions())
