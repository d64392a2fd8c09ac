"""Keep secrets out of every file posttrain writes (manifests, summaries, saved configs).

A secret is the value of a config key named like one (`api_key`, `hub_token`, `password`)
or the value of an environment variable named like one (`WANDB_API_KEY`, `HF_TOKEN`),
wherever it shows up in a string, e.g. through `${oc.env:HF_TOKEN}`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# environment variables whose values are secrets: WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY...
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
# config keys whose values are secrets (not `pad_token` or `max_new_tokens`)
SECRET_KEY = re.compile(r"^(token|(api|access|auth|hub|hf)_?(key|token)|.*(secret|passw|credential).*)$", re.I)
# shorter values, paths and numbers (SOME_KEY_DIR=/data) are not treated as secrets
MIN_SECRET_LENGTH = 8
REDACTED = "***"


def secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if SECRET_ENV.search(k) and _looks_secret(v)}
    return sorted(values, key=len, reverse=True)


def _looks_secret(value: str) -> bool:
    return len(value) >= MIN_SECRET_LENGTH and not value.startswith(("/", "~", ".")) and not value.isdigit()


def _secret_field(key: Any, value: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.match(key)) and isinstance(value, str) and bool(value)


def redact_text(text: str, values: list[str] | None = None) -> str:
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, values: list[str] | None = None) -> Any:
    """A copy of `obj` (dicts, lists, strings) with secret values replaced by `***`."""
    values = secret_values() if values is None else values
    if isinstance(obj, dict):
        return {k: REDACTED if _secret_field(k, v) else redact(v, values) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, values) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, values)
    return obj


def scrub_file(path: Path) -> None:
    """Rewrite a text file (e.g. Hydra's `.hydra/overrides.yaml`) without secret values."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return
    clean = redact_text(text)
    if clean != text:
        path.write_text(clean)
