"""Every recipe and every config option composes and validates; every field is documented."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.plan import load_config
from tests.conftest import REPO, compose_tree

CONF = REPO / "conf"
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
GROUPS = ["model", "data", "sft", "align", "peft", "deepspeed", "logger", "pairs"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
QLORA_HERE = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    cfg = load_config(compose_tree([f"recipe={recipe}"]))
    assert cfg.stages, recipe


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "pairs":  # a data stage: mounted as a section of its own, read by the next stage
        overrides = [f"+pairs@pairs={option}", "run.stages=[sft,pairs,align]", "align.data={path:'stage:pairs'}"]
    if (group, option) == ("sft", "none"):
        overrides.append("align.init_from=base")  # nothing to start from otherwise
    if group == "model" and option != "tiny":  # the default recipe's settings are the tiny model's
        with pytest.raises(ConfigError, match=r"^model.path: .* is not the built-in tiny model, but recipe tiny_sft"):
            load_config(compose_tree(overrides))
        overrides.append("recipe=smollm2_sft_dpo")
    if (group, option) == ("peft", "qlora") and not QLORA_HERE:
        with pytest.raises(ConfigError, match="^peft.method: qlora needs "):
            load_config(compose_tree(overrides))
        return
    cfg = load_config(compose_tree(overrides))
    if group in ("sft", "align"):
        assert (group in cfg.stages) == (option != "none")


def test_recipes_exist_that_the_readme_names():
    assert {"tiny_sft_dpo", "tiny_sft_orpo", "zephyr_sft_dpo", "qwen2_5_0_5b_sft_orpo"} <= set(RECIPES)


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")) + sorted((REPO / "recipes").glob("*.yaml")))
def test_every_field_is_documented(path):
    """Every key in conf/ has a comment line right above it; every recipe opens with its command."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#"), f"{path} must open with a comment"
    if path.parent.name == "recipes":
        assert "posttrain" in "\n".join(lines[:4]), f"{path}: first lines must show the command"
        return
    in_defaults = False
    for i, line in enumerate(lines):
        if re.match(r"^(defaults|hydra):", line):
            in_defaults = True
            continue
        if in_defaults and (line.startswith(" ") or not line.strip()):
            continue
        in_defaults = False
        if re.match(r"^\s*[A-Za-z_][\w]*:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"{path.name}:{i + 1} {line.strip()!r} has no comment above it"


def test_recipe_override_swaps_the_method():
    cfg = load_config(compose_tree(["align=orpo"]))
    assert cfg.stages["align"].method == "orpo"
    assert load_config(compose_tree([])).stages["align"].method == "dpo"
    cfg = load_config(compose_tree(["recipe=tiny_sft_orpo", "align=dpo"]))
    assert cfg.stages["align"].method == "dpo"


def test_values_override():
    cfg = load_config(compose_tree(["align.beta=0.2", "sft.num_train_epochs=2", "run.output_dir=/tmp/x"]))
    assert cfg.stages["align"].beta == 0.2
    assert cfg.stages["sft"].num_train_epochs == 2
    assert str(cfg.run.output_path) == "/tmp/x"


BAD = [
    (["align.method=ppo"], "align.method: unknown method 'ppo'; allowed: none, sft, dpo, orpo"),
    (["sft.learning_rate=-1e-5"], "sft.learning_rate: -1e-05 must be > 0"),
    (
        ["align.init_from=rm"],
        "align.init_from: 'rm' is not a stage that runs before 'align'; allowed: base, previous, sft",
    ),
    (["sft=none"], "align.init_from: 'sft' is not a stage that runs before 'align'; allowed: base, previous"),
    (["data.sft.path=null"], "sft.data.path: is null and there are no sources; give a path"),
    (["data.sft.dedup=fuzzy"], "sft.data.dedup: 'fuzzy' is not one of none, exact, normalized"),
    (["data.sft.format=chatml"], "sft.data.format: 'chatml' is not one of auto, messages, prompt_completion"),
    (["+data.sft.columns.answer=output"], "sft.data.columns.answer: not a field; allowed: chosen, completion"),
    (
        ["+data.sft.sources=[{path: builtin:sft}]"],
        "sft.data.path: give one source (path) or a mixture (sources), not both; set sft.data.path=null",
    ),
    (["data.sft.path=null", "+data.sft.sources=[{path: builtin:sft, weight: -1}]"], "sft.data.sources[0].weight: -1"),
    (["data.preference.path=/nonexistent/prefs.jsonl"], "align.data.path: '/nonexistent/prefs.jsonl' does not exist"),
    (["+sft.learnin_rate=1e-4"], "sft.learnin_rate: unknown key; did you mean learning_rate?"),
    (["data.sft.path=builtin:chat"], "sft.data.path: 'builtin:chat' is not one of builtin:sft, builtin:preference"),
    (["align.loss_type=[sigmoid,foo]"], "align.loss_type: unknown 'foo'; allowed: sigmoid"),
    (["model.dtype=fp8"], "model.dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
    (["sft=none", "align=none"], "run.stages: no stage runs"),
    (["+sft.gate.min_reward_accuracy=0.5"], "sft.gate.min_reward_accuracy: sft has no rewards"),
    (
        ["sft.eval.exact_match=false", "sft.gate.min_exact_match=0.5"],
        "sft.gate.min_exact_match: needs sft.eval.exact_match",
    ),
    (
        ["model.path=/tmp"],
        "model.path: /tmp is not the built-in tiny model, but recipe tiny_sft_dpo's learning rates and epochs are "
        "tuned for it; use a recipe for pretrained models (qwen2_5_0_5b_sft_orpo, smollm2_rm_sft_dpo, "
        "smollm2_self_curated_sft, smollm2_sft, smollm2_sft_dpo, smollm2_sft_grpo, zephyr_sft_dpo)",
    ),
    (["recipe=smollm2_sft_dpo", "model=tiny"], "recipe smollm2_sft_dpo is tuned for pretrained models; use one of"),
    (["run.tuned_for=small"], "run.tuned_for: 'small' is not one of tiny, pretrained, null"),
    (["sweep.direction=up"], "sweep.direction: 'up' is not one of ('maximize', 'minimize')"),
    (["sweep.objective=dpo.exact_match"], "sweep.objective: 'dpo' is not a stage; allowed: base, sft, align"),
    (
        ["data.builtin.tasks=[add,divide]"],
        "data.builtin.tasks: unknown task 'divide'; allowed: add, reverse, sort, count",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_gives_one_line_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(compose_tree(overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_resolved_config_is_plain_data(tmp_path):
    tree = compose_tree([f"run.output_dir={tmp_path}"])
    assert tree["sft"]["data"]["path"] == "builtin:sft"  # interpolations resolved
    assert Path(tree["run"]["cache_dir"]).name
