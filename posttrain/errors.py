"""posttrain's one-line errors. Every mistake a user can fix (a config key, a data row, a file,
a lock held by another run) raises a subclass of PosttrainError whose message is one line naming
the key, file or row and what is allowed; the entry points (`posttrain`, the workers) catch
PosttrainError once and print `error: <message>`.

    require(stage.learning_rate > 0, "sft.learning_rate", "must be > 0")   # ConfigError if not
"""

from __future__ import annotations

import difflib


class PosttrainError(Exception):
    """A mistake or failure told to the user as one line (no traceback)."""


class ConfigError(PosttrainError, ValueError):
    """A config mistake; the message is one line naming the key and what is allowed."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def unknown_key(name: str, allowed: list[str]) -> str:
    """What to say of a key that is not among `allowed`: the closest ones, else all of them."""
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {' or '.join(close)}?"
    return f"unknown key; allowed: {', '.join(sorted(allowed))}"
