"""Stage artifact folders and their manifests.

A stage folder holds the model (safetensors) and tokenizer in plain Hugging Face format,
`metrics.jsonl`, `checkpoints/` while it trains, and `manifest.json`. The manifest says
`running` while the stage trains, `interrupted` after a preemption, `failed` after an
error, and `complete` only once everything else is written; it records the size of every
file, so a truncated artifact is never taken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain import distributed
from posttrain.config import config_dir
from posttrain.errors import PosttrainError
from posttrain.secrets import redact

MANIFEST = "manifest.json"
LIBRARIES = ("posttrain", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed")


class ArtifactError(PosttrainError):
    """An artifact could not be written (full disk, unwritable folder)."""


class GateError(PosttrainError):
    """A stage missed a bound of its `gate`: the chain stops after it (its artifact is complete)."""


@dataclass
class Artifact:
    name: str
    # what from_pretrained loads: a folder, or the base model's hub id
    source: str
    # the stage key (posttrain.stage_cache) of the model `source` holds
    key: str = ""
    # the stage's own folder (a data stage's differs from `source`, its parent's model)
    folder: str = ""


def hash_json(content: Any) -> str:
    """A short, stable hash of JSON-able content (keys sorted): stage keys, cache file names."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, computed once per process for a given size and modification time."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (secrets redacted) to a temporary file in the same folder, fsync, rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(redact(data), f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be created or written (None: it can), found by trying: a folder and a
    4 KiB file made where it is (or in its nearest existing parent), then removed. Asking instead
    (os.access) says yes to root on a read-only or pseudo file system (/proc) and on a full disk."""
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is not a writable folder"  # a file in the way
    try:
        probe = Path(tempfile.mkdtemp(prefix=".posttrain-probe-", dir=existing))
        try:
            with (probe / "probe").open("wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as e:
        return f"{existing} is not a writable folder ({e.strerror or e})"
    return None


def remove_folder(folder: Path) -> None:
    """Delete `folder` so that a crash part-way never leaves it half-deleted under its own name (a
    stage folder without its manifest, which no re-run would trust): renamed aside, then deleted;
    what an earlier crash left aside goes too."""
    for left in folder.parent.glob(f".{folder.name}.removing-*"):
        shutil.rmtree(left, ignore_errors=True)
    aside = folder.with_name(f".{folder.name}.removing-{os.getpid()}")
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (e.g. cut short by a crash)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_manifest(folder: Path) -> dict | None:
    manifest = read_json(folder / MANIFEST)
    return manifest if isinstance(manifest, dict) else None


def is_complete(folder: Path) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("status") == "complete"


def awaits_evaluation(manifest: dict) -> bool:
    """A complete stage whose run stopped before evaluating it: the same command evaluates it
    (even with run.reuse=false: it is that run's own work)."""
    return manifest.get("status") == "complete" and manifest.get("evaluated") is False


# subfolders whose files are part of an artifact (a data stage's pairs); others (checkpoints,
# ref_logps written later by other stages, ranks) are not
ARTIFACT_SUBFOLDERS = ("pairs",)


def file_sizes(folder: Path) -> dict[str, int]:
    """Sizes of the files that make up the saved model and tokenizer, or a data stage's data
    (not checkpoints or the manifest)."""
    files = [f for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST]
    files += [f for sub in ARTIFACT_SUBFOLDERS if (folder / sub).is_dir() for f in sorted((folder / sub).iterdir())]
    return {str(f.relative_to(folder)): f.stat().st_size for f in files if f.is_file() and not f.name.startswith(".")}


def damage(folder: Path, manifest: dict) -> str | None:
    """Why a complete-looking artifact cannot be used (a file missing or of the wrong size), or None."""
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, its manifest says {size}"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step of a transformers checkpoint folder (`checkpoint-<step>`)."""
    return int(checkpoint.name.rsplit("-", 1)[1])


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was fully written (its trainer_state.json, written last, parses)."""
    written = [p for p in (folder / "checkpoints").glob("checkpoint-*") if read_json(p / "trainer_state.json")]
    return max(written, key=checkpoint_step, default=None)


def provenance() -> dict[str, Any]:
    """Where and with what an artifact was made: host, world size, library versions, recipe commit."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "hosts": int(os.environ.get("SLURM_NNODES") or os.environ.get("NNODES") or 1),
        "world_size": distributed.world_size(),
        "recipe_commit": recipe_commit(),
        "versions": library_versions(),
    }


@cache
def recipe_commit() -> dict[str, Any] | None:
    """The git commit (and whether it has uncommitted changes) of the folder the recipes come from."""
    folder = config_dir()
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", folder, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "folder": folder}
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
