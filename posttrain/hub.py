"""The Hugging Face hub, asked once: is it reachable from here, and is a model already cached.

A machine without hub access (a login node, an offline cluster) would otherwise sit through
the libraries' retries (five of 8 s each) on every hub id. `reachable()` tries one connection
(3 s at most) and, when it fails, sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE for this process
and the workers it starts, so transformers, datasets and huggingface_hub read their local caches
and never retry.

    ok, why = reachable()
    if not ok and not cached("Qwen/Qwen2.5-0.5B"): ...
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

# `org/name` (or a bare legacy `name`) as the hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONNECT_SECONDS = 3.0


def is_hub_id(path: str) -> bool:
    """A model or dataset path that names a hub repository, not a local folder or builtin data."""
    return ":" not in path and bool(HUB_ID.match(path)) and not Path(path).expanduser().exists()


def _offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


@functools.cache
def reachable() -> tuple[bool, str]:
    """(whether the hub answers, why not); HF_HUB_OFFLINE=1 counts as unreachable."""
    if _offline_set():
        return False, "HF_HUB_OFFLINE=1"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
        return True, ""
    except OSError as e:
        why = f"{host} cannot be reached: {e.strerror or type(e).__name__}"
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:  # imported before the variable was set: tell it too
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    return False, why


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """A file of a hub model in the local hub cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) else None


def cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether a model's config.json is in the local hub cache."""
    return cached_file(repo_id, "config.json", revision) is not None


def download(repo_id: str, filename: str, revision: str | None = None) -> str:
    """One file of a hub model, fetched (call `reachable()` first); OSError when it cannot be."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except (HfHubHTTPError, ValueError) as e:  # no such repository or file, gated, bad revision
        raise OSError(f"{repo_id}: {str(e).strip().splitlines()[0]}") from None
