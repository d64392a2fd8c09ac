"""The configuration reference (docs/reference/, generated from the schema when the site builds):
every field of every section and method has a comment, in conf/ or in its dataclass, and the
reference lists every field and every option file."""

from __future__ import annotations

import dataclasses

from posttrain.config import DeepSpeedConfig, LauncherConfig, ModelConfig, RunConfig, StageConfig
from posttrain.stages import STAGES
from tests.docs.helpers import reference

REF = reference()


def test_every_field_in_the_reference_has_a_comment():
    assert REF.missing_comments() == []


def test_a_field_without_a_comment_is_reported():
    @dataclasses.dataclass
    class Undocumented:
        # what it does
        documented: int = 1
        bare: int = 2

    page = REF.Page("x.md")
    page.fields(REF.Block(Undocumented, "x", [None]))
    assert REF.missing_comments([page]) == ["x.md: x-bare"]


def anchors() -> dict[str, set[str]]:
    return {page.name: {e.anchor for b in page.blocks for e in b.entries()} for page in REF.build_pages()}


def test_every_field_of_the_sections_has_an_entry():
    found = anchors()
    for page, prefix, cls in [
        ("model.md", "model", ModelConfig),
        ("run.md", "run", RunConfig),
        ("launcher.md", "launcher", LauncherConfig),
        ("launcher.md", "deepspeed", DeepSpeedConfig),
        ("stages.md", "stage", StageConfig),
    ]:
        names = {f"{prefix}-{f.name}" for f in dataclasses.fields(cls)}
        assert names <= found[page[:]], names - found[page]
    assert {"stage-max_steps", "stage-eval-num_prompts", "model-tiny-hidden_size", "data-sources-item-weight"} <= set(
        set().union(*found.values())
    )


def test_every_method_option_lists_its_own_fields():
    found = anchors()["stages.md"]
    for group, option, method in [("align", "dpo", "dpo"), ("align", "grpo", "grpo"), ("pairs", "onpolicy", "pairs")]:
        base = {f.name for f in dataclasses.fields(STAGES["grpo"].config_cls.__mro__[1])}
        own = (
            {f.name for f in dataclasses.fields(STAGES[method].config_cls)}
            - base
            - {f.name for f in dataclasses.fields(StageConfig)}
        )
        assert {f"{group}-{option}-{name}" for name in own} <= found, option


def test_every_option_file_is_shown():
    text = "\n".join(line for page in REF.build_pages() for line in page.lines)
    for path in sorted(REF.CONF.glob("*/*.yaml")):
        if path.parent.name == "shared":
            continue
        assert f'"`{path.parent.name}={path.stem}`: conf/{path.parent.name}/{path.name}"' in text, path


def test_the_header_of_an_option_is_not_its_first_keys_comment():
    model = REF.yaml_file("model/llama3_1_8b.yaml")
    assert model.description.startswith("Llama-3.1-8B base")
    assert model.comments["path"] == "hub id or local folder"
    dpo = REF.yaml_file("align/dpo.yaml")
    assert dpo.description.startswith("Direct Preference Optimization")
    assert dpo.comments["method"] == "method name from the stage registry"
