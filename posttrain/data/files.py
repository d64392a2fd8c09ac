"""Local data files: which files a source's split reads, and their content read without the
`datasets` library, so that a bad file is one line naming the file, the line or row, and what is
wrong (empty, binary, not UTF-8, a JSON line cut short, a JSON array where lines are expected)
instead of a library traceback. `posttrain` checks every local source this way at plan time.

    files = split_files(Path("data/chat.jsonl"), data_dir=None, split="train")
    for f in files:
        rows = read_rows(f)       # list of dicts, or None when too large to read here
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from posttrain.data.formats import DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
# files up to this size are read whole at plan time and every row checked; larger ones get the
# line-by-line check of JSON lines only (their rows are checked when the stage loads them)
READ_WHOLE_BYTES = 256 * 2**20


def file_type(f: Path) -> str:
    """`.jsonl` of `train.jsonl.gz`: the suffix that picks the builder (compression is read through)."""
    suffixes = f.suffixes
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSED:
        return suffixes[-2]
    return f.suffix


# --- which files ----------------------------------------------------------------------------


def _named_split_files(folder: Path, split: str) -> list[Path]:
    """Files named after a split (`test_sft.jsonl`, `data/train_sft-00000-of-00003.parquet`), one type."""
    found = sorted(
        f for f in [*folder.glob(f"{split}[.-]*"), *folder.glob(f"data/{split}[.-]*")] if file_type(f) in FILE_BUILDERS
    )
    return [f for f in found if FILE_BUILDERS[file_type(f)] == FILE_BUILDERS[file_type(found[0])]]


def data_files(folder: Path) -> list[Path]:
    """Every file under `folder` that a builder reads, sorted."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and file_type(f) in FILE_BUILDERS)


def folder_files(folder: Path, split: str) -> list[Path]:
    """The files of one split of a local folder: named after the split, or, in a folder of
    plain data files with no split names and no dataset card, all of them as `train`."""
    if files := _named_split_files(folder, split):
        return files
    found = data_files(folder)
    named = any(f.name.startswith(SPLIT_NAMES) for f in found)
    if split != "train" or named or (folder / "README.md").exists() or not found:
        return []  # a hub-style folder: datasets reads its card
    types = sorted({FILE_BUILDERS[file_type(f)] for f in found})
    if len(types) > 1:
        raise DataError(f"{folder}: holds {' and '.join(types)} files; keep one type per folder, or list each file")
    return found


def split_files(local: Path, data_dir: str | None, split: str) -> list[Path]:
    """The local files one split of a source reads (a file: itself, for every split); [] for a
    hub-style folder, which `datasets` reads through its card."""
    if local.is_file():
        if file_type(local) not in FILE_BUILDERS:
            allowed = ", ".join(FILE_BUILDERS)
            raise DataError(f"{local}: unsupported file type {file_type(local)!r}; allowed: {allowed} (also gzipped)")
        return [local]
    folder = local / data_dir if data_dir else local
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (data_dir {data_dir!r} of {local})")
    files = folder_files(folder, split)
    if not files and not (folder / "README.md").exists():
        if not data_files(folder):
            raise DataError(f"{folder}: holds no data files ({', '.join(FILE_BUILDERS)}, also gzipped)")
        names = ", ".join(f.name for f in data_files(folder)[:5])
        raise DataError(f"{folder}: no file of split {split!r} (a name starting with {split}); found: {names}")
    return files


# --- where a row is -------------------------------------------------------------------------


@dataclass
class Origin:
    """A loaded split and where its rows live, to name a row in an error message."""

    label: str
    files: list[Path] = field(default_factory=list)

    def where(self, index: int) -> str:
        """`data/chat.jsonl line 18`, or `org/name [train] row 17 (0-based)`."""
        for f in self.files:
            positions = _row_positions(f)
            if positions is None:
                break
            if index < len(positions):
                return f"{f} {positions[index]}"
            index -= len(positions)
        return f"{self.label} row {index} (0-based)"


def _row_positions(f: Path) -> list[str] | None:
    """Each row's position in a local file (error path only: reads the file)."""
    if is_json_lines(f):
        return [f"line {n}" for n, _ in json_lines(f)]
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [f"row {i} (0-based)" for i in range(pq.ParquetFile(f).metadata.num_rows)]
    return None


# --- reading ----------------------------------------------------------------------------------


def _open(f: Path) -> IO[bytes] | None:
    """The file's bytes, decompressed; None for a compression this module cannot read (zstd)."""
    if f.suffix in COMPRESSED:
        opener = COMPRESSED[f.suffix]
        return opener(f, "rb") if opener else None
    return f.open("rb")


def is_json_lines(f: Path) -> bool:
    """A .json/.jsonl file holding one object per line (not one JSON array)."""
    if file_type(f) not in (".json", ".jsonl") or (stream := _open(f)) is None:
        return False
    with stream:
        try:
            return not stream.read(1000).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        except OSError:  # a damaged archive: read_rows names it
            return True


def _text(f: Path, n: int, line: bytes) -> str:
    if b"\0" in line:
        raise DataError(f"{f} line {n}: holds a NUL byte: a binary file, not {file_type(f)} text")
    try:
        return line.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{f} line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
        ) from None


def json_lines(f: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSON-lines file, every line checked: text, UTF-8, one JSON object."""
    stream = _open(f)
    if stream is None:
        return
    with stream:
        try:
            first = True
            for n, line in enumerate(stream, 1):
                text = _text(f, n, line).rstrip("\r\n")
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    if first and text.lstrip().startswith("["):
                        raise DataError(_array_in_lines(f)) from None
                    raise DataError(f"{f} line {n}: not valid JSON ({_json_problem(e)})") from None
                if not isinstance(row, dict):
                    if first and isinstance(row, list):
                        raise DataError(_array_in_lines(f))
                    raise DataError(f"{f} line {n}: expected a JSON object per line, got {_json_type(row)}")
                first = False
                yield n, row
        except (OSError, EOFError, lzma.LZMAError) as e:  # a damaged or cut-short archive
            raise DataError(f"{f}: cannot be read ({e})") from None


def _json_problem(e: json.JSONDecodeError) -> str:
    """`Expecting value at column 15`, `Unterminated string starting at column 32`."""
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def _json_type(value) -> str:
    """What JSON calls a parsed value's type."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _array_in_lines(f: Path) -> str:
    return (
        f"{f}: holds one JSON array, but a {file_type(f)} file holds one JSON object per line; write one row "
        "per line, or name the file .json"
    )


def _decode(f: Path, data: bytes) -> str:
    """A whole file's text; a NUL byte or a byte that is not UTF-8 named by its line."""
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise DataError(f"{f} line {line}: holds a NUL byte: a binary file, not {file_type(f)} text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        byte = f"byte 0x{data[e.start]:02x}"
        raise DataError(f"{f} line {line}: not UTF-8 text ({byte}); save the file as UTF-8") from None


def _json_array(f: Path, data: bytes) -> list[dict]:
    text = _decode(f, data)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{f} line {e.lineno}: not valid JSON ({_json_problem(e)})") from None
    if not isinstance(rows, list):
        raise DataError(f"{f}: holds one JSON {_json_type(rows)}; expected an array of row objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{f} row {i} (0-based): expected a JSON object, got {_json_type(row)}")
    return rows


def _csv_rows(f: Path, data: bytes) -> list[dict]:
    text = _decode(f, data)
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise DataError(f"{f}: not valid CSV ({e})") from None


def _parquet_rows(f: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(f).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{f}: not a readable Parquet file ({str(e).strip().splitlines()[0]})") from None


def is_empty(f: Path) -> bool:
    """True for a file with nothing but whitespace in its first MiB (and no more than that)."""
    stream = _open(f)
    if stream is None or f.suffix == ".parquet":
        return f.stat().st_size == 0
    with stream:
        try:
            head = stream.read(2**20 + 1)
        except (OSError, EOFError, lzma.LZMAError):
            return False  # damaged: the reader names it
    return len(head) <= 2**20 and not head.strip(b"\xef\xbb\xbf \t\r\n")


def read_rows(f: Path) -> list[dict] | None:
    """Every row of a local data file, its content checked on the way (DataError names the file
    and line); None when the file is too large to read here or compressed with zstd."""
    kind = file_type(f)
    if f.stat().st_size > READ_WHOLE_BYTES or (f.suffix in COMPRESSED and COMPRESSED[f.suffix] is None):
        if kind in (".json", ".jsonl") and is_json_lines(f):
            for _ in json_lines(f):  # every line checked, nothing kept
                pass
        return None
    if kind == ".parquet":
        return _parquet_rows(f)
    stream = _open(f)
    assert stream is not None
    with stream:
        try:
            data = stream.read()
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"{f}: cannot be read ({e})") from None
    if kind == ".csv":
        return _csv_rows(f, data)
    start = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if start == b"[":
        if kind == ".jsonl":
            raise DataError(_array_in_lines(f))
        return _json_array(f, data)
    try:
        return [row for _, row in json_lines(f)]
    except DataError:
        if start == b"{" and kind == ".json":  # one pretty-printed object, not rows
            _json_array(f, data)  # raises, naming what it holds
        raise
