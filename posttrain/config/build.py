"""Building the schema's dataclasses from the composed Hydra tree: every key checked against the
fields (unknown keys name the allowed ones, wrong types name the expected one), and where the yaml
lives (`config_dir`).

    cfg = build(RunConfig, {"seed": 1}, "run")     # RunConfig(seed=1), or one ConfigError line
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, require, unknown_key

# `data.path: stage:<name>`: the dataset an earlier data stage (pairs) wrote
STAGE_PREFIX = "stage:"
# `model.path: package:<distribution>/<file>`: a file an installed PyPI package ships (posttrain/checkpoints.py)
PACKAGE_PREFIX = "package:"


def config_dir() -> str:
    """The yaml this schema describes: conf/ as package data (wheel install), else the source
    checkout's conf/ (editable)."""
    packaged = Path(__file__).parents[1] / "conf"
    source = Path(__file__).resolve().parents[2] / "conf"
    return str(packaged if packaged.is_dir() else source)


def check_local_path(path: str, key: str) -> None:
    """A path that is clearly local (absolute, ./, ~) must exist; anything else may be a hub id."""
    if path.startswith(PACKAGE_PREFIX):
        return
    local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
    if local and not Path(path).expanduser().exists():
        raise ConfigError(f"{key}: {path!r} does not exist (a local path); give an existing path or a hub id")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        require(isinstance(value, dict), key, f"expected a section with fields, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        require(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    require(ok, key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type, data: dict, key: str = "") -> Any:
    """`cls(**data)` with every field checked; unknown keys name the allowed ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for name in data:
        if name not in fields:
            raise ConfigError(f"{prefix}{name}: {unknown_key(name, sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)
