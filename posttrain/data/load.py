"""Load a stage's rows from every source through `datasets.load_dataset`, check, curate and mix them.

Sources: `builtin:sft` / `builtin:preference` (generated files), a local json/jsonl/
parquet/csv file, a local folder of such files (splits from file names, or a hub-style
folder with a README), or a hub id (config name, split, revision). Each source's rows are
renamed by its `columns` mapping, checked and converted by `formats`, split into train and
held-out, curated (`curate`) and mixed by weight or row count (`mixture`). Every error is
one line naming the file, row and field, raised before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.data import curate, files, formats, mixture, score
from posttrain.data.files import FILE_BUILDERS, Origin, file_type
from posttrain.data.formats import DataError, FormatError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from posttrain.config import DataSource, SourceConfig

__all__ = ["DataError", "StageData", "load_stage_data"]


@dataclass
class StageData:
    train: Dataset
    eval: Dataset | None
    # where the rows came from, for messages and the manifest
    origin: str
    # what curation removed, the mixture, token lengths (data_report.json)
    report: dict[str, Any] = field(default_factory=dict)
    # tokens per kept row (for the length histogram); empty without a tokenizer
    lengths: list[int] = field(default_factory=list)


# --- loading one split -------------------------------------------------------------------------


def _csv_as_text(f: Path) -> dict[str, Any]:
    """Read every CSV column as text (an answer "42" stays a string; an empty cell is "")."""
    import csv

    from datasets import Features, Value

    if f.suffix != ".csv":
        return {}
    with f.open(newline="") as text:
        names = next(csv.reader(text), [])
    return {"features": Features({name: Value("string") for name in names}), "keep_default_na": False}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_split(path: str, src: SourceConfig, split: str, kind: str) -> tuple[Dataset, Origin]:
    """One split of one source, as the library loads it, and where its rows live."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    local = Path(path).expanduser()
    found = files.split_files(local, src.data_dir, split) if local.exists() else []
    for f in found:
        if files.is_empty(f):
            raise DataError(f"{f}: is empty (no rows)")
    try:
        if found:
            builder = FILE_BUILDERS[file_type(found[0])]
            kwargs = _csv_as_text(found[0]) if builder == "csv" else {}
            ds = load_dataset(builder, data_files=[str(f) for f in found], split="train", **kwargs)
        else:
            where = str(local) if local.is_dir() else path
            ds = load_dataset(where, name=src.name, data_dir=src.data_dir, split=split, revision=src.revision)
    except DatasetGenerationError as e:
        _explain_load_failure(found, src, kind)
        raise DataError(f"{path}: could not load ({_first_line(e.__cause__ or e)})") from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{path}: has no split {split!r} ({_first_line(e)})") from None
        _explain_load_failure(found, src, kind)
        raise DataError(f"{path}: could not load ({_first_line(e)})") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(f"{path}: could not load ({_first_line(e)})") from None
    label = str(found[0]) if len(found) == 1 else f"{path} [{split}]"
    return ds, Origin(label, found)


def _explain_load_failure(found: list[Path], src: SourceConfig, kind: str) -> None:
    """The library could not read a local file: find the malformed line, or the row and field
    whose type differs from the others, and raise that instead."""
    for f in found:
        if files.is_json_lines(f):
            _check_file_rows(f, [row for _, row in files.json_lines(f)], src, kind)


def _check_file_rows(f: Path, rows: list[dict], src: SourceConfig, kind: str) -> None:
    """Every row of one local file checked as its stage reads them (DataError names the row)."""
    if not rows:
        raise DataError(f"{f}: is empty (no rows)")
    names = list(dict.fromkeys(k for row in rows for k in row))

    def columns(wanted: list[str]) -> dict[str, list]:
        return {name: [row.get(name) for row in rows] for name in wanted}

    check_rows(names, rows[0], columns, src, kind, Origin(str(f), [f]))


def check_source(src: SourceConfig, kind: str) -> None:
    """Plan time, before any model or library loads: a local source's files (each split it
    reads) opened and every row checked as a stage of `kind` will read it. The built-in data,
    an earlier stage's pairs and hub datasets are checked when they load."""
    local = Path(src.path).expanduser()
    if src.path.startswith(("builtin:", "stage:")) or not local.exists():
        return
    for split in dict.fromkeys(s for s in (src.split, src.eval_split) if s):
        for f in files.split_files(local, src.data_dir, split):
            if (rows := files.read_rows(f)) is not None:
                _check_file_rows(f, rows, src, kind)


# --- checking and converting ---------------------------------------------------------------


def _targets(names: list[str], src: SourceConfig) -> dict[str, str]:
    """Each source column -> the posttrain field it fills (`columns: {field: column}` renames;
    a column shadowed by a rename is left out)."""
    renamed = {column: target for target, column in src.columns.items()}
    return {c: renamed.get(c, c) for c in names if c in renamed or c not in src.columns}


def check_rows(
    names: list[str],
    first: dict,
    columns: Callable[[list[str]], dict[str, list]],
    src: SourceConfig,
    kind: str,
    origin: Origin,
) -> tuple[str, list[dict]]:
    """Rename, pick the format, check and convert every row: (format, rows). `first` is the first
    row (it tells HH text from other pairs); `columns(names)` gives those columns as lists."""
    for target, column in src.columns.items():
        if column not in names:
            raise DataError(f"{origin.label}: columns.{target}: no column {column!r}; found: {', '.join(names)}")
    targets = _targets(names, src)
    source_of = {target: column for column, target in targets.items()}
    first_chosen = first.get(source_of["chosen"]) if "chosen" in source_of else None
    try:
        fmt = formats.detect(list(source_of), kind, src.format, first_chosen)
    except FormatError as e:
        raise DataError(f"{origin.label}: {e}") from None
    needed = formats.needed_columns(fmt, list(source_of))
    values = columns([source_of[t] for t in needed])
    return fmt, formats.convert({t: values[source_of[t]] for t in needed}, fmt, kind, origin.where)


def read_rows(src: SourceConfig, split: str, kind: str, builtin_folder: Path) -> tuple[str, list[dict], str]:
    """(format, checked rows, label) of one split of one source."""
    path = str(builtin_folder / src.path.split(":", 1)[1]) if src.path.startswith("builtin:") else src.path
    ds, origin = load_split(path, src, split, kind)
    if len(ds) == 0:
        raise DataError(f"{origin.label}: has no rows")

    def columns(wanted: list[str]) -> dict[str, list]:
        return ds.select_columns(wanted).to_dict()

    fmt, rows = check_rows(ds.column_names, ds[0], columns, src, kind, origin)
    return fmt, rows, origin.label


# --- a stage's data ---------------------------------------------------------------------------


def load_stage_data(
    data: DataSource,
    kind: str,
    builtin_folder: Path,
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    step_rows: int | None = None,
    scorer: score.Scorer | None = None,
) -> StageData:
    """Train and held-out rows for one stage of `kind` (sft | preference | unpaired | prompt):
    every source checked, held out, curated (and scored by `scorer`, with `data.score` set), then
    mixed, and at most `step_rows` train rows kept (what the stage's max_steps read; None: all);
    `report` says what each step did."""
    from datasets import Dataset

    parts = []
    for src in data.source_list():
        fmt, train, label = read_rows(src, src.split, kind, builtin_folder)
        eval_split = src.eval_split or ("test" if src.path.startswith("builtin:") else None)
        if eval_split is not None:
            _, held_out, _ = read_rows(src, eval_split, kind, builtin_folder)
        else:
            train, held_out = mixture.hold_out(train, data.eval_fraction, seed)
        parts.append(mixture.Part(src, label, fmt, train, held_out))
    curated = curate.curate(parts, data, tokenizer, max_length)
    scored = {}
    if data.score.by is not None:
        if scorer is None:
            raise DataError(f"score.by: {data.score.by!r} was not loaded (a scorer is built by the pipeline)")
        scored = score.keep_best(parts, data.score, scorer, seed)
    if not any(p.train for p in parts):
        sources = ", ".join(p.label for p in parts)
        raise DataError(f"{sources}: no train rows left after curation ({curated.removed_text(parts)})")
    train, used = mixture.mix(parts, data.max_rows, seed)
    mixed = len(train)
    train = mixture.cap(train, step_rows, seed)
    held_out = mixture.cap([row for p in parts for row in p.held_out], data.max_eval_rows, seed)
    report = curated.report(parts, used, len(train), len(held_out))
    if scored:
        report["score"] = scored
    if step_rows is not None:
        report.update(step_rows=step_rows, mixed_rows=mixed)
    origin = " + ".join(p.label for p in parts)
    return StageData(
        train=Dataset.from_list(train),
        eval=Dataset.from_list(held_out) if held_out else None,
        origin=origin,
        report=report,
        lengths=curated.lengths,
    )
