"""Load a stage's rows from any source through `datasets.load_dataset`, check and normalise them.

Sources: `builtin:sft` / `builtin:preference` (generated files), a local json/jsonl/
parquet/csv file, a local folder of such files (splits from file names), or a hub id.
SFT rows become `messages` (or stay `prompt`/`completion`); preference rows become
conversational `prompt`/`chosen`/`rejected`, the prompt taken from the shared prefix
when the source keeps whole conversations (ultrafeedback_binarized).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

    from posttrain.config import DataSource

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad data; the message names the source, row and field."""


@dataclass
class StageData:
    train: Dataset
    eval: Dataset | None
    # where the rows came from, for messages and the manifest
    origin: str


def _load_split(path: str, src: DataSource, split: str) -> Dataset:
    from datasets import load_dataset

    local = Path(path).expanduser()
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported file type {local.suffix!r}; allowed: {', '.join(FILE_BUILDERS)}")
        return load_dataset(builder, data_files=str(local), split="train")
    if local.is_dir() and (files := _split_files(local, split)):
        return load_dataset(FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files], split="train")
    try:
        return load_dataset(str(local) if local.is_dir() else path, name=src.name, split=split, revision=src.revision)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{path}: has no split {split!r} ({str(e).splitlines()[0]})") from None
        raise DataError(f"{path}: could not load ({str(e).splitlines()[0]})") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(f"{path}: could not load ({str(e).splitlines()[0]})") from None


def _split_files(folder: Path, split: str) -> list[Path]:
    """Files named after a split (`test_sft.jsonl`, `data/train_sft-00000-of-00003.parquet`), one type."""
    found = sorted(
        f for f in [*folder.glob(f"{split}[.-]*"), *folder.glob(f"data/{split}[.-]*")] if f.suffix in FILE_BUILDERS
    )
    return [f for f in found if FILE_BUILDERS[f.suffix] == FILE_BUILDERS[found[0].suffix]]


def load_stage_data(src: DataSource, kind: str, builtin_folder: Path, seed: int) -> StageData:
    """Train and held-out rows for one stage, checked and normalised for `kind` (sft|preference)."""
    path, eval_split = src.path, src.eval_split
    if path.startswith("builtin:"):
        path, eval_split = str(builtin_folder / path.split(":", 1)[1]), eval_split or "test"
    train = _load_split(path, src, src.split)
    if eval_split is not None:
        held_out = _load_split(path, src, eval_split)
    elif src.eval_fraction > 0:
        parts = train.train_test_split(test_size=src.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    else:
        held_out = None
    train = _cap(train, src.max_rows, seed)
    held_out = _cap(held_out, src.max_eval_rows, seed) if held_out is not None else None
    normalise = to_sft if kind == "sft" else to_preference
    train = normalise(train, f"{src.path} [{src.split}]")
    if held_out is not None:
        held_out = normalise(held_out, f"{src.path} [{eval_split or 'held-out'}]")
    return StageData(train=train, eval=held_out, origin=src.path)


def _cap(ds: Dataset, max_rows: int | None, seed: int) -> Dataset:
    if max_rows is None or len(ds) <= max_rows:
        return ds
    return ds.shuffle(seed=seed).select(range(max_rows))


# --- formats ----------------------------------------------------------------------------


def _check_messages(messages, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {field}[{i}] must have 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: {field}[{i}].role {m['role']!r}; allowed: system, user, assistant, tool")


def to_sft(ds: Dataset, origin: str) -> Dataset:
    """Keep `messages` (or `prompt`+`completion`); every row must have an assistant reply."""
    columns = set(ds.column_names)
    if "messages" in columns:
        for i, row in enumerate(ds["messages"]):
            where = f"{origin} row {i}"
            _check_messages(row, where, "messages")
            if not any(m["role"] == "assistant" for m in row):
                raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
        # `task` (built-in data) lets evaluation report accuracy per task
        return ds.select_columns(["messages", *(["task"] if "task" in columns else [])])
    if {"prompt", "completion"} <= columns:
        return ds.select_columns(["prompt", "completion"])
    raise DataError(
        f"{origin}: SFT rows need a 'messages' column or 'prompt' and 'completion'; found: {', '.join(sorted(columns))}"
    )


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Implicit prompt: the longest shared prefix of two conversations is the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def to_preference(ds: Dataset, origin: str) -> Dataset:
    """Conversational `prompt`/`chosen`/`rejected` from explicit or implicit-prompt rows."""
    columns = set(ds.column_names)
    missing = {"chosen", "rejected"} - columns
    if missing:
        raise DataError(
            f"{origin}: preference rows need 'chosen' and 'rejected' (and usually 'prompt'); "
            f"missing {', '.join(sorted(missing))}; found: {', '.join(sorted(columns))}"
        )

    def convert(row: dict, i: int) -> dict:
        where = f"{origin} row {i}"
        chosen, rejected = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
        _check_messages(chosen, where, "chosen")
        _check_messages(rejected, where, "rejected")
        if chosen[0]["role"] != "assistant":  # whole conversations: prompt is the shared prefix
            prompt, chosen, rejected = split_conversations(chosen, rejected)
        elif "prompt" in row and row["prompt"] is not None:
            prompt = _as_messages(row["prompt"], "user")
        else:
            raise DataError(f"{where}: 'chosen' is a bare reply but the row has no 'prompt'")
        _check_messages(prompt, where, "prompt")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return ds.map(convert, with_indices=True, remove_columns=ds.column_names, desc="Checking preference rows")
