"""Reference log-probs (DPO, KTO) computed once and kept on disk beside the reference artifact.

TRL can precompute the reference model's log-probs of every chosen and rejected reply
before training (`precompute_ref_log_probs`), so no reference forward pass runs per step.
Its own cache lives in a temporary folder for in-memory datasets; this keeps the two
columns in `<reference artifact>/ref_logps/<split>-<key>.parquet` (the base model's under
`<cache>/ref_logps/<base key>/`), keyed by the reference's stage key, the model's dtype and
attention, and the tokenized rows themselves, so every later stage or sweep point over
the same reference and data reuses them. The policy equals the reference when the
trainer is built, so no second copy of the weights is loaded to compute them.

The pass runs in parts of PART_BATCHES batches (on every rank), each kept in
`<split>-<key>.parts/<first row>-<end row>.parquet` as it is done: a pass stopped by a signal
(or killed) resumes at the first missing part, and gives the same numbers (a part's batches are
the whole pass's). The whole file is written (and the parts removed) once every part is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.distributed import agree
from posttrain.locks import FileLock

if TYPE_CHECKING:
    from datasets import Dataset

    from posttrain.preemption import PreemptionGuard

# the tokenized rows of a pair (DPO) or a single labelled reply (KTO)
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label")
# batches (of every rank) per part of the pass: what a stop loses at most, and how often the
# ranks of a multi-process run look for a stop request together
PART_BATCHES = 4


@dataclass(frozen=True)
class RefLogpsCache:
    """Where a stage's reference log-probs are kept and what identifies the reference."""

    folder: Path
    reference_key: str
    # the model's dtype and attention implementation (they change the numbers)
    model_settings: str
    # stops the pass between parts (and, in a process alone, inside one) when a signal came
    guard: PreemptionGuard | None = field(default=None, compare=False, repr=False)


def rows_digest(dataset: Dataset) -> str:
    """sha256 of the tokenized rows (their arrow buffers), independent of how they were made."""
    import pyarrow as pa

    # one chunk and no metadata (it holds the dataset's fingerprint, which names the steps that made
    # it): the same rows give the same bytes however many processes tokenized them
    # with_format("arrow")[:]: the rows in the dataset's order (a shuffle or select is an indices
    # mapping over `.data`, which keeps the old order)
    table = dataset.select_columns([c for c in TOKEN_COLUMNS if c in dataset.column_names]).with_format("arrow")[:]
    table = table.combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def cache_path(cache: RefLogpsCache, split: str, dataset: Dataset) -> Path:
    identity = f"{cache.reference_key}|{cache.model_settings}|{rows_digest(dataset)}"
    return cache.folder / f"{split}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.parquet"


def caching_trainer(trainer_cls: type, trainer_module, cache: RefLogpsCache, log):
    """A TRL trainer class (DPOTrainer, KTOTrainer) whose precomputed reference log-probs are read
    from / written to `cache.folder`; `trainer_module` is the module that defines it."""
    from datasets import Dataset, concatenate_datasets

    class CachingTrainer(trainer_cls):
        # split name -> "cache" or "computed", for tests and the log
        ref_logps_source: dict[str, str] = {}
        # seconds spent computing or reading them (forward passes a per-step reference would run)
        ref_logps_seconds = 0.0

        def __init__(self, *args, **kwargs):
            # TRL names the reference by hashing every weight (seconds for a 0.5B model, each time
            # a trainer is built); its stage key and settings name it as well.
            hash_weights = trainer_module.hash_module
            identity = hashlib.sha256(f"{cache.reference_key}|{cache.model_settings}".encode()).hexdigest()
            trainer_module.hash_module = lambda module: identity
            try:
                super().__init__(*args, **kwargs)
            finally:
                trainer_module.hash_module = hash_weights

        def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
            started = time.perf_counter()
            phase = f"the reference log-prob pass ({name} rows)"
            stoppable = cache.guard.interruptible(phase) if cache.guard else contextlib.nullcontext()
            try:
                with stoppable:
                    return self._cached_ref_logps(dataset, name, batch_size)
            finally:
                self.ref_logps_seconds += time.perf_counter() - started

        def _cached_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
            path = cache_path(cache, name, dataset)
            # parallel jobs over the same reference and rows (sweep points on a cluster) wait for
            # the one computing them, then read its file; rank 0 holds the lock for its job
            lock = FileLock(
                path.with_name(f"{path.name}.lock"),
                f"reference log-probs {path.name}",
                wait=True,
                on_wait=lambda holder: log(f"waiting for {holder}, which computes the same reference log-probs"),
            )
            with lock if self.accelerator.is_main_process else contextlib.nullcontext():
                return self._read_or_compute(dataset, name, batch_size, path)

        def _read_or_compute(self, dataset: Dataset, name: str, batch_size: int, path: Path) -> Dataset:
            if self.accelerator.num_processes > 1:
                # TRL hands its computed columns from rank 0 to the others through a file that, for an
                # in-memory dataset, it names in each process's own temporary folder: name a shared one
                cache.folder.mkdir(parents=True, exist_ok=True)
                dataset._get_cache_file_path = lambda fingerprint: str(cache.folder / f"trl-{fingerprint}.arrow")
            if agree(path.is_file()):  # every rank reads the file, or every rank computes
                cached = Dataset.from_parquet(str(path))
                if len(cached) == len(dataset):
                    self.ref_logps_source = {**self.ref_logps_source, name: "cache"}
                    log(f"reference log-probs of the {name} rows reused from {path}")
                    return concatenate_datasets([dataset, cached], axis=1)
            added = self._computed_in_parts(dataset, name, batch_size, path)
            if self.accelerator.is_main_process:
                _write_parquet(added, path)
                shutil.rmtree(parts_folder(path), ignore_errors=True)
                log(f"reference log-probs of the {name} rows saved to {path}")
            return concatenate_datasets([dataset, added], axis=1)

        def _computed_in_parts(self, dataset: Dataset, name: str, batch_size: int, path: Path) -> Dataset:
            """The reference columns of `dataset`, part by part; a part kept by an earlier, stopped
            attempt is read back."""
            parts, size = parts_folder(path), batch_size * self.accelerator.num_processes * PART_BATCHES
            columns, reused = [], 0
            for start in range(0, len(dataset), size):
                end = min(start + size, len(dataset))
                part_path = parts / f"{start:010d}-{end:010d}.parquet"
                if agree(part_path.is_file()):
                    columns.append(Dataset.from_parquet(str(part_path)))
                    reused += 1
                    continue
                rows = dataset.select(range(start, end))
                if self.accelerator.num_processes > 1:  # TRL's hand-over file, shared (see above)
                    rows._get_cache_file_path = lambda fingerprint: str(cache.folder / f"trl-{fingerprint}.arrow")
                out = super()._precompute_ref_logps(rows, name, batch_size)
                part = out.select_columns([c for c in out.column_names if c not in rows.column_names])
                if self.accelerator.is_main_process:
                    _write_parquet(part, part_path)
                columns.append(part)
                if end < len(dataset) and cache.guard is not None:
                    cache.guard.check(f"during the reference log-prob pass ({name} rows, {end} of {len(dataset)})")
            if reused:
                log(f"reference log-probs of the {name} rows: {reused} of {len(columns)} parts reused from {parts}")
            self.ref_logps_source = {**self.ref_logps_source, name: "computed" if reused < len(columns) else "parts"}
            return concatenate_datasets(columns)

    CachingTrainer.__name__ = f"Caching{trainer_cls.__name__}"
    return CachingTrainer


def parts_folder(path: Path) -> Path:
    """Where the parts of the pass that writes `path` are kept until the whole file is written."""
    return path.with_name(f"{path.stem}.parts")


def _write_parquet(dataset: Dataset, path: Path) -> None:
    """`dataset` to `path` through a temporary file and a rename (a cut-short file is never seen)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        dataset.to_parquet(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def with_cached_reference(trainer_cls: type, trainer_module, cache: RefLogpsCache | None, settings: str) -> type:
    """`trainer_cls`, or with a cache its subclass that keeps the precomputed reference log-probs
    in `cache.folder`; `settings`: what else the log-probs depend on (truncation, batching)."""
    if cache is None:
        return trainer_cls
    cache = dataclasses.replace(cache, model_settings=f"{cache.model_settings}|{settings}")
    return caching_trainer(trainer_cls, trainer_module, cache, log=lambda m: print(f"[posttrain] {m}", flush=True))
