"""Where a stage's learning rate and length came from: the command line, the recipe, a tuned file
(conf/tuned/<model>_<method>.yaml), the method's option or the shared stage defaults. The plan prints
it, so a user sees which numbers were meant for which model.

    origins(choices, overrides, ["sft", "align"])
    # {"sft": {"learning_rate": "recipe smollm2_sft_dpo", ...}, "align": {"learning_rate": "tuned tiny_dpo", ...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import config_dir

# the fields whose origin the plan shows
TRACED = ("learning_rate", "num_train_epochs", "max_steps")


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def recipe_chain(recipe: str | None) -> list[str]:
    """The recipe and the recipes it builds on (its defaults list), nearest first."""
    chain: list[str] = []
    todo = [recipe] if recipe else []
    while todo:
        name = todo.pop(0)
        if name in chain:
            continue
        chain.append(name)
        for entry in _yaml(Path(config_dir()) / "recipe" / f"{name}.yaml").get("defaults", []):
            if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
                todo.append(entry)
    return chain


def _option_of(stage: str, choices: dict[str, str | None]) -> tuple[str, str] | None:
    """(group, option) a stage section came from: `align: dpo`, or `align@align2: dpo`."""
    for key, option in choices.items():
        group, _, package = key.partition("@")
        if option and (package or group) == stage and group not in ("tuned", "recipe"):
            return group, option
    return None


def origins(choices: dict[str, str | None], overrides: list[str], stages: list[str]) -> dict[str, dict[str, str]]:
    """stage -> field -> where its value came from (TRACED fields only)."""
    conf = Path(config_dir())
    recipes = recipe_chain(choices.get("recipe"))
    found: dict[str, dict[str, str]] = {}
    for stage in stages:
        option = _option_of(stage, choices)
        tuned = choices.get(f"tuned@{stage}")
        layers = [(f"recipe {r}", _yaml(conf / "recipe" / f"{r}.yaml").get(stage) or {}) for r in recipes]
        if tuned:
            layers.append((f"tuned {tuned}", _yaml(conf / "tuned" / f"{tuned}.yaml")))
        if option:
            layers.append((f"{option[0]}/{option[1]} default", _yaml(conf / option[0] / f"{option[1]}.yaml")))
        layers.append(("shared default", _yaml(conf / "shared" / "stage.yaml")))
        found[stage] = {}
        for field in TRACED:
            given = any(o.lstrip("+").split("=")[0] == f"{stage}.{field}" for o in overrides)
            found[stage][field] = "command line" if given else next((w for w, t in layers if field in t), "default")
    return found
