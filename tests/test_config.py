"""The schema (posttrain/config.py): its batch arithmetic (global_batch_size gives the accumulation
for the planned world), and its dataclass defaults, which the yaml users read holds field by field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from posttrain.cli import compose_tree
from posttrain.config import (
    DataConfig,
    DeepSpeedConfig,
    LauncherConfig,
    LoggerConfig,
    ModelConfig,
    PeftConfig,
    RunConfig,
    SweepConfig,
    config_dir,
)
from posttrain.plan import load_config
from posttrain.stage_cache import stage_keys
from posttrain.stages import STAGES


def config(*overrides: str, tmp_path: Path | None = None):
    run = [f"run.output_dir={tmp_path / 'run'}"] if tmp_path else []
    return load_config(compose_tree([*run, *overrides]))


def test_global_batch_size_sets_the_accumulation_for_the_planned_world():
    cfg = config(
        "launcher=torchrun", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0",
        "sft.per_device_train_batch_size=4", "sft.global_batch_size=256",
    )  # fmt: skip
    assert cfg.stages["sft"].gradient_accumulation_steps == 256 // (4 * 32)


def test_a_global_batch_is_keyed_by_the_accumulation_it_gives():
    via_global = stage_keys(config("sft.per_device_train_batch_size=32", "sft.global_batch_size=64"))
    via_accumulation = stage_keys(config("sft.per_device_train_batch_size=32", "sft.gradient_accumulation_steps=2"))
    assert via_global == via_accumulation != stage_keys(config("sft.per_device_train_batch_size=32"))


# --- the yaml users read and the dataclass defaults agree --------------------------------

# the option of each group whose values are the section's dataclass defaults; each method's own
# option (align/dpo.yaml ...) holds its StageConfig subclass's defaults
SECTION_OPTIONS = {
    ("model", "tiny"): ModelConfig,
    ("data", "tiny"): DataConfig,
    ("peft", "none"): PeftConfig,
    ("deepspeed", "none"): DeepSpeedConfig,
    ("launcher", "local"): LauncherConfig,
    ("logger", "none"): LoggerConfig,
}
METHOD_OPTIONS = {("sft", "default"): "sft", ("pairs", "onpolicy"): "pairs"}
METHOD_OPTIONS.update({("align", m): m for m in ("dpo", "orpo", "kto", "cpo", "simpo", "rm", "grpo")})


def option_tree(group: str, option: str) -> dict:
    """One option of a config group as its yaml composes (shared defaults included), unresolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_container(compose(f"{group}/{option}")[group], resolve=False)


def disagreements(tree: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Every field where the yaml and the dataclass differ (or one of them lacks it)."""
    out = []
    for name in sorted(set(tree) | set(defaults)):
        key = f"{prefix}{name}"
        if name not in tree or name not in defaults:
            out.append(f"{key}: {'only in the dataclass' if name in defaults else 'only in the yaml'}")
        elif isinstance(tree[name], dict) and isinstance(defaults[name], dict) and tree[name]:
            out += disagreements(tree[name], defaults[name], key + ".")
        elif tree[name] != defaults[name] and not (
            isinstance(defaults[name], tuple) and list(defaults[name]) == tree[name]
        ):
            out.append(f"{key}: yaml {tree[name]!r}, dataclass {defaults[name]!r}")
    return out


@pytest.mark.parametrize(("group", "option"), list(METHOD_OPTIONS), ids=[f"{g}={o}" for g, o in METHOD_OPTIONS])
def test_each_methods_option_holds_its_dataclass_defaults_field_by_field(group, option):
    tree = option_tree(group, option)
    # `data` points into the data group (${data.sft}); that group's values are checked below
    assert tree.pop("data").startswith("${data.")
    defaults = dataclasses.asdict(STAGES[METHOD_OPTIONS[group, option]].config_cls())
    defaults.pop("data")
    assert disagreements(tree, defaults) == []


# values a section's default option sets on purpose, unlike the dataclass (which any other source takes)
DELIBERATE = {
    # the generated tasks repeat short prompts by design; a user's source is deduplicated by default
    ("data", "tiny"): {"sft.dedup", "preference.dedup"},
}


@pytest.mark.parametrize(("group", "option"), list(SECTION_OPTIONS), ids=[f"{g}={o}" for g, o in SECTION_OPTIONS])
def test_each_sections_default_option_agrees_with_its_dataclass_on_every_field_it_writes(group, option):
    tree = option_tree(group, option)
    defaults = dataclasses.asdict(SECTION_OPTIONS[group, option]())
    found = disagreements(tree, {k: v for k, v in defaults.items() if k in tree})
    assert [d for d in found if d.split(":")[0] not in DELIBERATE.get((group, option), set())] == []


def test_the_root_configs_run_and_sweep_sections_hold_their_dataclass_defaults():
    import yaml

    root = yaml.safe_load((Path(config_dir()) / "config.yaml").read_text())
    run = {k: v for k, v in root["run"].items() if "${" not in str(v)}  # name, folders: interpolated
    defaults = {k: v for k, v in dataclasses.asdict(RunConfig()).items() if k in run}
    assert disagreements(run, defaults) == []
    assert disagreements(root["sweep"], dataclasses.asdict(SweepConfig())) == []


def test_every_option_of_a_method_group_pulls_in_the_shared_stage_fields():
    """The fields every stage shares are written once (conf/shared/stage.yaml), not in each option."""
    shared = set(option_tree("shared", "stage"))
    for path in sorted(Path(config_dir()).glob("*/*.yaml")):
        if path.parent.name not in ("sft", "align", "pairs") or "method: none" in path.read_text():
            continue
        text = path.read_text()
        assert "- /shared/stage@_here_" in text, path
        own = {line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()} - {"defaults"}
        tree = option_tree(path.parent.name, path.stem)
        repeated = [k for k in own & shared if tree[k] == option_tree("shared", "stage")[k]]
        assert repeated == [], f"{path.name} repeats shared values: {repeated}"
