"""Where training data comes from, read through Hugging Face `datasets`, offline.

`--data` takes:

- a file or a glob of files: ``.jsonl``/``.json``, ``.csv``, ``.parquet``, ``.arrow`` (``.txt`` stays with
  `records.load_records`: documents separated by blank lines);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- any other folder of data files (``datasets`` picks the splits from the file names, e.g. ``data/train-*.parquet``);
- a dataset name (``org/name``) in the local Hugging Face cache: its Hub snapshot (``datasets--org--name``),
  else the Arrow cache ``datasets`` prepared when it was loaded once (this needs HF_HUB_OFFLINE=1, which the
  CLI sets, so that ``datasets`` looks there without asking the Hub).

Every source is read as a ``datasets.IterableDataset`` (rows streamed from the files, nothing copied into a
cache), so the in-memory path and ``--streaming`` share one reader. Each row carries where it came from,
``file:row N`` (N counts the rows of that file from 1), so that errors name it; when ``datasets`` cannot parse
a JSON Lines or CSV file, lorakit's own line reader finds the line and says what is wrong with it.
"""
from __future__ import annotations

import csv
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lorakit.core.errors import LorakitError
from lorakit.training.data.json_values import json_value
from lorakit.training.data.records import ONE_OBJECT_PER_LINE, detect_format, load_records, record_format, validate_record
from lorakit.training.hub import cached_snapshot, is_repo_id

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_SUFFIX = ".txt"
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class DataOptions:
    """How to read a source: which split, which columns are which fields, how many rows at most.

    Attributes:
        split: the split of a dataset name, save_to_disk folder or data folder (files are all "train").
        columns: lorakit field -> the data's column, e.g. {"output": "answer"}.
        max_samples: read at most this many rows (0: all).
    """

    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    max_samples: int = 0


@dataclass(frozen=True)
class Part:
    """One readable source: a file (with its `datasets` builder), a folder, a save_to_disk folder or a name."""

    kind: str   # "file" | "folder" | "disk" | "name"
    path: str
    label: str  # what errors name
    builder: str | None = None


def parse_columns(items: list[str]) -> dict[str, str]:
    """`--columns output=answer,instruction=question` -> {"output": "answer", "instruction": "question"}.

    Raises:
        LorakitError: an item is not `field=column`, or a field is mapped twice.
    """
    mapping: dict[str, str] = {}
    for item in items:
        target, sep, source = item.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise LorakitError(f"--columns: {item!r} is not field=column; write e.g. output=answer,instruction=question.")
        if target.strip() in mapping:
            raise LorakitError(f"--columns maps {target.strip()!r} twice; give each field one column.")
        mapping[target.strip()] = source.strip()
    return mapping


def is_text_file(spec: str) -> bool:
    """A plain-text file (documents separated by blank lines), read by lorakit itself."""
    return spec.lower().endswith(TEXT_SUFFIX) and not any(c in spec for c in GLOB_CHARS)


def resolve(spec: str, split: str) -> list[Part]:
    """The parts `--data spec` names, in reading order (a glob's files sorted by name).

    Raises:
        LorakitError: nothing matches, a file has an extension `datasets` does not read, or a name is not
            in the local cache.
    """
    if any(c in spec for c in GLOB_CHARS):
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not files:
            raise LorakitError(f"--data {spec!r}: the pattern matches no file; check the path and the pattern.")
        return [file_part(f) for f in files]
    path = Path(spec).expanduser()
    if path.is_file():
        return [file_part(str(path))]
    if path.is_dir():
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        return [Part("disk" if saved else "folder", str(path), f"{path}[{split}]")]
    if is_repo_id(spec) or ("/" not in spec and not path.suffix):
        try:
            return [Part("folder", str(cached_snapshot(spec, "dataset")), f"{spec}[{split}]")]
        except LorakitError:
            return [Part("name", spec, f"{spec}[{split}]")]
    raise LorakitError(f"--data {spec!r}: no such file or folder; give a data file, a glob, a folder, or a dataset "
                       "name in the local Hugging Face cache.")


def file_part(path: str) -> Part:
    suffix = Path(path).suffix.lower()
    if suffix not in BUILDERS:
        raise LorakitError(f"{path}: unsupported file extension {suffix!r}; training data files must be "
                           f"{', '.join(BUILDERS)} (or {TEXT_SUFFIX} alone).")
    return Part("file", path, path, BUILDERS[suffix])


def open_part(part: Part, split: str):
    """The part as a `datasets.IterableDataset` of row dicts.

    Raises:
        LorakitError: the split does not exist, or `datasets` cannot open the source.
    """
    import datasets

    try:
        if part.kind == "file":
            return datasets.load_dataset(part.builder, data_files=[part.path], split="train", streaming=True,
                                         **builder_options(part))
        if part.kind == "disk":
            return pick_split(datasets.load_from_disk(part.path), split, part).to_iterable_dataset()
        return datasets.load_dataset(part.path, split=split, streaming=True)
    except LorakitError:
        raise
    except (ValueError, KeyError) as error:  # datasets' answer to an unknown split
        raise LorakitError(f"{part.label}: {error}; pick a split with --split (--eval-split for --eval-data).") from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        from lorakit.training.hub import hub_cache_dir

        raise LorakitError(
            f"--data {part.path!r}: not a file or folder, and no dataset of that name in the local Hugging Face "
            f"caches ({hub_cache_dir()}, {datasets.config.HF_DATASETS_CACHE}); lorakit never downloads. Fetch it "
            f"on a machine with network access (`hf download {part.path} --repo-type dataset`) or pass a local path. "
            f"({type(error).__name__}: {error})") from None


def pick_split(saved, split: str, part: Part):
    """One split of a load_from_disk result (a Dataset has just one)."""
    if not hasattr(saved, "keys"):
        return saved
    if split not in saved:
        raise LorakitError(f"{part.path}: no split {split!r}; it has {', '.join(saved)}. Pick one with --split.")
    return saved[split]


def builder_options(part: Part) -> dict[str, Any]:
    """CSV cells stay text (pandas would turn '007' into 7 and empty cells into NaN), as lorakit's reader reads them."""
    if part.builder != "csv":
        return {}
    from datasets import Features, Value

    with open(part.path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise LorakitError(f"{part.path}:1: the CSV file has no header row; the first row must name the columns.")
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False,
            "encoding": "utf-8-sig"}


def iter_rows(parts: list[Part], options: DataOptions, format: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of the parts in order, columns renamed per `options.columns`, at most
    `options.max_samples` rows. `format` (when known) sharpens the diagnosis of a file `datasets` cannot parse.

    Raises:
        LorakitError: a mapped column is missing, or a part cannot be read (naming file and line where known).
    """
    count = 0
    for part in parts:
        try:
            rows = iter(open_part(part, options.split))
        except StopIteration:  # `datasets` infers the columns from the first row: an empty file has none
            continue
        except LorakitError:
            raise
        except Exception as error:  # noqa: BLE001 - as below
            raise diagnose(part, format, error) from None
        number = 0
        while not options.max_samples or count < options.max_samples:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as error:  # noqa: BLE001 - pyarrow/pandas/datasets each raise their own kinds
                raise diagnose(part, format, error) from None
            number += 1
            count += 1
            where = f"{part.label}:row {number}"
            yield where, rename(row, options.columns, where)


def rename(row: dict, columns: dict[str, str], where: str) -> dict:
    """The row with each mapped column under its lorakit field name."""
    if not columns:
        return row
    row = dict(row)
    for target, source in columns.items():
        if source not in row:
            raise LorakitError(f"{where}: --columns maps {target}={source}, but the data has no column {source!r}; "
                               f"its columns are {', '.join(sorted(row))}.")
        row[target] = row.pop(source)
    return row


def diagnose(part: Part, format: str | None, error: Exception) -> LorakitError:
    """The error for a file `datasets` failed to read: lorakit's line reader names the bad line of a JSON
    Lines or CSV file (bad JSON, a field of the wrong type); otherwise `datasets`' own message."""
    suffix = Path(part.path).suffix.lower()
    if part.kind == "file" and suffix in (".jsonl", ".csv"):
        if suffix == ".csv":
            load_records(part.path, format)  # raises the file:line error when it finds one
        else:
            check_json_lines(Path(part.path), format)
    return LorakitError(f"{part.label}: `datasets` cannot read it ({type(error).__name__}: {error}); check that it is "
                        f"valid {part.builder or 'data'} with the same columns in every row.")


def check_json_lines(path: Path, format: str | None) -> None:
    """Read a JSON Lines file line by line (memory bounded) and raise lorakit's error for its first bad line."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                check_json_line(line, f"{path}:{number}", format)
    except UnicodeDecodeError as e:
        raise LorakitError(f"{path}: a line holds bytes that are not UTF-8 ({e.reason}); save the file as UTF-8.") from None


def check_json_line(line: str, where: str, format: str | None) -> None:
    """One JSON Lines line: blank, or a JSON object that is a valid record."""
    if not line.strip():
        return
    row = json_value(line, where, dict, ONE_OBJECT_PER_LINE)
    validate_record(row, format or detect_format(row, where), where)


def validate_row(where: str, row: dict, format: str) -> dict:
    """`validate_record` of a row from `iter_rows`, with its `_at`. A JSON Lines row that fails is looked up
    in its file: `datasets` reads a column that mixes strings and numbers as one type, so the row that fails
    may not be the line that is wrong, and the line reader names that line.

    Raises:
        LorakitError: the row (or, in a JSON Lines file, an earlier line) is malformed.
    """
    try:
        return {**validate_record(row, format, where), "_at": where}
    except LorakitError:
        file = Path(where.rpartition(":row ")[0])
        if file.suffix.lower() == ".jsonl" and file.is_file():
            check_json_lines(file, format)
        raise


def read_records(spec: str, format: str | None, options: DataOptions) -> tuple[list[dict], str]:
    """Every row of `--data spec`, validated, in memory (see `iter_rows`).

    Args:
        spec: a file, glob, folder or dataset name.
        format: text, instruction, chat or sharegpt; None detects it from the first row.
        options: split, column mapping, row limit.

    Returns:
        (records, format) as `records.load_records` returns them, each record with its `_at`
        ("file:row N") for later errors.

    Raises:
        LorakitError: as `iter_rows`, a row fails validation (naming file:row), or no row was read.
    """
    if is_text_file(spec):
        records, format = load_records(spec, format)
        return records[: options.max_samples or None], format
    records = []
    for where, row in iter_rows(resolve(spec, options.split), options, format):
        format = format or detect_format(row, where)
        records.append(validate_row(where, row, format))
    if not records:
        raise LorakitError(f"--data {spec!r} holds no rows; add at least one.")
    assert format is not None  # set by the first row
    return records, record_format(format)


def run_options(cfg, held_out: bool = False) -> DataOptions:
    """The DataOptions of a run's --data (or, `held_out`, its --eval-data: --eval-split, every row)."""
    columns = parse_columns(cfg.columns)
    if held_out:
        return DataOptions(cfg.eval_split, columns)
    return DataOptions(cfg.split, columns, cfg.max_samples)


def read_held_out(cfg, train_format: str) -> list[dict]:
    """The records of a run's --eval-data, which must hold the same kind of records as --data.

    Raises:
        LorakitError: as `read_records`, or the two hold different kinds of records.
    """
    records, format = read_records(cfg.eval_data, None if cfg.format == "auto" else cfg.format,
                                   run_options(cfg, held_out=True))
    if format != train_format:
        raise LorakitError(f"--eval-data {cfg.eval_data} holds {format} records but --data holds {train_format} "
                           "records; give held-out data of the same kind.")
    return records
