"""Stage artifact folders and their manifests.

A stage folder holds the model (safetensors) and tokenizer in plain Hugging Face format,
`metrics.jsonl`, and `manifest.json`. The manifest is written last, atomically: a folder
is complete only when its manifest says `"status": "complete"`.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LIBRARIES = ("posttrain", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed")


@dataclass
class Artifact:
    name: str
    # what from_pretrained loads: a folder, or the base model's hub id
    source: str


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(folder: Path) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("status") == "complete"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
