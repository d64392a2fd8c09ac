"""The parts of the chain runner (posttrain/pipeline.py) that need no model: gates, the side-by-side
samples, `stage:<name>` sources and the folders they resolve to, the writable-folder and chat
template checks, which held-out conversations every stage is evaluated on, and the judge's win rate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset

from posttrain import chat_templates
from posttrain.config import GATE_METRICS, ConfigError, DataSource, EvalConfig, GateConfig, SourceConfig, StageConfig
from posttrain.data.load import StageData
from posttrain.pipeline import (
    _side_by_side,
    check_chat_template,
    check_writable,
    eval_conversations,
    judged,
    missed_gate,
    produced_by,
    with_stage_folders,
)
from posttrain.plan import load_config
from tests.conftest import compose_tree


def config(tmp_path: Path, *overrides: str):
    return load_config(compose_tree([f"run.output_dir={tmp_path / 'out'}", *overrides]))


# --- gates -----------------------------------------------------------------------------------


def gated(**bounds) -> StageConfig:
    return StageConfig(method="sft", gate=GateConfig(**bounds))


LOWER_BOUNDS = [bound for bound in GATE_METRICS if bound.startswith("min_")]


@pytest.mark.parametrize("bound", LOWER_BOUNDS)
def test_a_lower_bound_passes_at_or_above_it_and_misses_below(bound):
    stage, metric = gated(**{bound: 0.5}), GATE_METRICS[bound]
    assert missed_gate("sft", stage, {metric: 0.5}) is None
    assert missed_gate("sft", stage, {metric: 0.75}) is None
    message = missed_gate("sft", stage, {metric: 0.25})
    assert message == f"stage sft missed its gate: {metric} 0.25 < sft.gate.{bound}=0.5"


def test_an_upper_bound_passes_at_or_below_it_and_misses_above():
    stage = gated(max_response_loss=1.5)
    assert missed_gate("sft", stage, {"response_loss": 1.5}) is None
    assert missed_gate("sft", stage, {"response_loss": 0.1}) is None
    message = missed_gate("sft", stage, {"response_loss": 2.345678})
    assert message == "stage sft missed its gate: response_loss 2.346 > sft.gate.max_response_loss=1.5"


def test_every_gate_field_bounds_a_metric():
    assert set(GATE_METRICS) == {f.name for f in GateConfig.__dataclass_fields__.values()}
    assert all(bound.startswith(("min_", "max_")) for bound in GATE_METRICS)


def test_a_bound_on_a_metric_the_stage_did_not_report_is_missed():
    message = missed_gate("align", gated(min_win_rate=0.5), {"exact_match": 1.0})
    assert message == "align.gate.min_win_rate: the stage reported no win_rate_vs_parent"


def test_no_bounds_never_miss():
    assert missed_gate("sft", gated(), {}) is None
    assert missed_gate("sft", gated(), {"exact_match": 0.0}) is None


def test_the_first_missed_bound_is_reported():
    stage = gated(min_exact_match=0.5, max_response_loss=1.0)
    assert "exact_match 0.1 <" in missed_gate("sft", stage, {"exact_match": 0.1, "response_loss": 3.0})
    assert "response_loss 3 >" in missed_gate("sft", stage, {"exact_match": 0.9, "response_loss": 3.0})


# --- side-by-side samples --------------------------------------------------------------------


def replies_of(*texts: str) -> list[dict]:
    return [{"prompt": f"p{i}", "reference": f"r{i}", "reply": text} for i, text in enumerate(texts)]


def test_side_by_side_puts_every_stage_reply_next_to_the_prompt():
    replies = {"base": replies_of("b0", "b1", "b2"), "sft": replies_of("s0", "s1", "s2"), "align": replies_of("a0")}
    rows = _side_by_side(replies, 2)
    assert rows == [
        {"prompt": "p0", "reference": "r0", "base": "b0", "sft": "s0", "align": "a0"},
        {"prompt": "p1", "reference": "r1", "base": "b1", "sft": "s1"},  # align answered one prompt
    ]
    assert list(rows[0]) == ["prompt", "reference", "base", "sft", "align"]


def test_side_by_side_follows_the_base_model_prompts():
    assert _side_by_side({"sft": replies_of("s0")}, 4) == []
    assert _side_by_side({"base": replies_of("b0", "b1")}, 0) == []
    assert len(_side_by_side({"base": replies_of("b0", "b1")}, 10)) == 2


# --- stage:<name> sources --------------------------------------------------------------------


def test_produced_by_names_the_data_stages_a_stage_reads():
    assert produced_by(StageConfig(data=DataSource(path="stage:pairs"))) == ["pairs"]
    assert produced_by(StageConfig(data=DataSource(path="builtin:preference"))) == []
    mixture = DataSource(
        path=None,
        sources=[SourceConfig(path="stage:pairs"), SourceConfig(path="builtin:preference"), SourceConfig("stage:more")],
    )
    assert produced_by(StageConfig(data=mixture)) == ["pairs", "more"]


def test_a_stage_source_reads_the_pairs_its_stage_wrote_with_their_test_split(tmp_path):
    data = DataSource(path="stage:pairs", format="preference", max_rows=10)
    resolved = with_stage_folders(data, {"pairs": tmp_path / "run" / "pairs"})
    assert resolved.path == str(tmp_path / "run" / "pairs" / "pairs")
    assert resolved.eval_split == "test"
    assert (resolved.format, resolved.max_rows) == ("preference", 10)
    assert data.path == "stage:pairs" and data.eval_split is None  # the config is not changed


def test_a_stage_source_keeps_its_own_eval_split(tmp_path):
    data = DataSource(path="stage:pairs", eval_split="validation")
    assert with_stage_folders(data, {"pairs": tmp_path}).eval_split == "validation"


def test_other_sources_are_left_as_they_are(tmp_path):
    data = DataSource(path="builtin:preference")
    assert with_stage_folders(data, {"pairs": tmp_path}) == data


def test_a_mixture_resolves_only_its_stage_sources(tmp_path):
    builtin = SourceConfig(path="builtin:preference", weight=1.0)
    data = DataSource(path=None, sources=[SourceConfig(path="stage:pairs", weight=3.0), builtin], max_rows=50)
    resolved = with_stage_folders(data, {"pairs": tmp_path / "pairs-stage"})
    first, second = resolved.sources
    assert (first.path, first.eval_split, first.weight) == (str(tmp_path / "pairs-stage" / "pairs"), "test", 3.0)
    assert second == builtin
    assert resolved.path is None and resolved.max_rows == 50
    assert data.sources[0].path == "stage:pairs"


# --- checks before training ------------------------------------------------------------------


def test_a_writable_folder_is_made_with_its_parents_and_left_clean(tmp_path):
    folder = tmp_path / "a" / "b" / "run"
    check_writable(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_folder_under_a_file_is_a_config_error_naming_run_output_dir(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "run"
    with pytest.raises(ConfigError) as raised:
        check_writable(folder)
    message = str(raised.value)
    assert message.startswith("run.output_dir: cannot write to") and str(folder) in message
    assert "Not a directory" in message


PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_a_template_with_a_generation_block_passes_the_chat_template_check(tmp_path):
    cfg = config(tmp_path)
    assert cfg.stages["sft"].assistant_only_loss
    check_chat_template(cfg, SimpleNamespace(chat_template=chat_templates.CHATML), "org/model")


@pytest.mark.parametrize("template", [PLAIN_TEMPLATE, None])
def test_assistant_only_loss_without_a_generation_block_is_a_config_error(tmp_path, template):
    cfg = config(tmp_path)
    with pytest.raises(ConfigError) as raised:
        check_chat_template(cfg, SimpleNamespace(chat_template=template), "org/model")
    message = str(raised.value)
    assert message.startswith("sft.assistant_only_loss: the chat template of 'org/model' cannot mark")
    assert "chatml" in message and "sft.assistant_only_loss=false" in message


def test_loss_on_whole_conversations_needs_no_generation_block(tmp_path):
    cfg = config(tmp_path, "sft.assistant_only_loss=false")
    check_chat_template(cfg, SimpleNamespace(chat_template=PLAIN_TEMPLATE), "org/model")
    no_sft = config(tmp_path, "sft=none", "align.init_from=base")  # DPO has no assistant_only_loss
    check_chat_template(no_sft, SimpleNamespace(chat_template=PLAIN_TEMPLATE), "org/model")


# --- held-out conversations ------------------------------------------------------------------


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


SFT_EVAL = Dataset.from_dict({"messages": [user("1+1") + assistant("2"), user("2+2") + assistant("4")]})
PREFERENCE_EVAL = Dataset.from_dict(
    {"prompt": [user("3+3"), user("4+4")], "chosen": [assistant("6"), assistant("8")], "rejected": [assistant("7")] * 2}
)
TRAIN = Dataset.from_dict({"messages": [user("x") + assistant("y")]})


def data(eval_rows: Dataset | None) -> StageData:
    return StageData(train=TRAIN, eval=eval_rows, origin="test")


def test_the_sft_stage_held_out_conversations_are_evaluated(tmp_path):
    cfg = config(tmp_path)
    assert eval_conversations(cfg, {"sft": data(SFT_EVAL), "align": data(PREFERENCE_EVAL)}) is SFT_EVAL


def test_without_sft_held_out_rows_the_preference_prompts_with_chosen_replies_are_evaluated(tmp_path):
    expected = [user("3+3") + assistant("6"), user("4+4") + assistant("8")]
    cfg = config(tmp_path)
    rows = eval_conversations(cfg, {"sft": data(None), "align": data(PREFERENCE_EVAL)})
    assert rows.column_names == ["messages"] and rows["messages"] == expected
    only_align = config(tmp_path, "sft=none", "align.init_from=base")
    assert eval_conversations(only_align, {"align": data(PREFERENCE_EVAL)})["messages"] == expected


def test_no_held_out_rows_means_no_evaluation(tmp_path):
    cfg = config(tmp_path)
    assert eval_conversations(cfg, {"sft": data(None), "align": data(None)}) is None


# --- the judge -------------------------------------------------------------------------------


def judged_stage() -> StageConfig:
    return StageConfig(method="dpo", eval=EvalConfig(judge="exact_match"))


def records(*correct: bool, prompts: str = "abcd") -> list[dict]:
    return [{"prompt": p, "reply": str(c), "correct": c} for p, c in zip(prompts, correct, strict=False)]


def test_the_exact_match_judge_scores_wins_ties_and_losses(capsys):
    # prompt a: win (1), b: tie (0.5), c: loss (0), d: tie (0.5)
    replies = {"sft": records(False, True, True, False), "align": records(True, True, False, False)}
    assert judged("align", judged_stage(), "sft", replies) == {"win_rate_vs_parent": 0.5}
    replies["align"] = records(True, True, True, False)  # a win and three ties
    assert judged("align", judged_stage(), "sft", replies) == {"win_rate_vs_parent": 0.625}
    assert "win rate over sft by exact_match: 0.625" in capsys.readouterr().out


def test_only_prompts_both_stages_answered_are_judged():
    replies = {"sft": records(False, False, prompts="ab"), "align": records(True, False, True, prompts="axy")}
    assert judged("align", judged_stage(), "sft", replies) == {"win_rate_vs_parent": 1.0}


def test_no_win_rate_when_the_parent_has_no_replies_to_the_same_prompts(capsys):
    replies = {"sft": records(True, prompts="z"), "align": records(True, prompts="a")}
    assert judged("align", judged_stage(), "sft", replies) == {}
    assert judged("align", judged_stage(), "base", {"align": records(True)}) == {}
    assert "set base.eval.judge too" in capsys.readouterr().out
