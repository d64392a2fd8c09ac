"""Curation by score through the pipeline (issue 32) on the tiny model: the built-in checker keeps
the right replies of noisy SFT data, an `rm` stage of the same recipe scores the SFT rows of the
chain `rm -> sft`, a probe stage's likelihood scores them in `probe -> sft`, balance holds per
source of a mixture, and scores are read back from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.data.builtin import TaskSpec, solve
from posttrain.errors import ConfigError
from posttrain.pipeline import builtin_folder, run_pipeline
from posttrain.plan import load_config
from tests.conftest import FAST, compose_tree

NOISY = ["data.builtin.sft_noise=0.4", "run.stages=[sft]", "sft.max_steps=2"]
RM_FIRST = [
    "+align@rm=rm",
    "run.stages=[rm,sft]",
    "rm.init_from=base",
    "rm.max_steps=4",
    "rm.per_device_train_batch_size=16",
    "rm.eval.num_prompts=16",
    "sft.max_steps=2",
    "data.builtin.sft_noise=0.4",
    "data.sft.score.by=rm",
    "data.sft.score.keep=0.5",
]


# the model's own signal: a probe SFT on every (noisy) row, then sft from the base on the rows whose
# replies the probe finds most likely
PROBE_FIRST = [
    "+sft@probe=default",
    "run.stages=[probe,sft]",
    "probe.data={path: builtin:sft}",
    "probe.max_steps=30",
    "probe.per_device_train_batch_size=16",
    "probe.learning_rate=3e-3",
    "probe.eval.num_prompts=16",
    "sft.init_from=base",
    "sft.max_steps=2",
    "data.builtin.sft_noise=0.4",
    "data.sft.score.by=loss",
    "data.sft.score.model=probe",
    "data.sft.score.keep=0.5",
]


def _config(tmp_path: Path, cache_dir: Path, *overrides: str, out: str = "run"):
    tree = compose_tree([*FAST, *overrides, f"run.output_dir={tmp_path / out}", f"run.cache_dir={cache_dir}"])
    return load_config(tree)


def _report(folder: Path) -> dict:
    return json.loads((folder / "data_report.json").read_text())["sft"]


def test_the_noise_option_makes_a_share_of_sft_replies_wrong_and_leaves_the_rest(tmp_path):
    clean = builtin_folder(load_config(compose_tree([f"run.cache_dir={tmp_path}", "data.builtin.num_sft=400"])))
    noisy_cfg = load_config(
        compose_tree([f"run.cache_dir={tmp_path}", "data.builtin.num_sft=400", "data.builtin.sft_noise=0.4"])
    )
    noisy = builtin_folder(noisy_cfg)
    assert noisy != clean and TaskSpec(sft_noise=0.0).fingerprint() == TaskSpec().fingerprint()
    rows = {name: [json.loads(line) for line in (f / "sft" / "train.jsonl").read_text().splitlines()]
            for name, f in (("clean", clean), ("noisy", noisy))}  # fmt: skip
    wrong = [r for r in rows["noisy"] if r["messages"][1]["content"] != solve(r["messages"][0]["content"])]
    assert len(wrong) == 160, "40% of 400"
    assert all(r["messages"][1]["content"] == solve(r["messages"][0]["content"]) for r in rows["clean"])
    assert [r["messages"][0] for r in rows["noisy"]] == [r["messages"][0] for r in rows["clean"]], "same prompts"
    assert (noisy / "sft" / "test.jsonl").read_text() == (clean / "sft" / "test.jsonl").read_text()


def test_the_checker_keeps_only_right_replies_balanced_by_task(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir, *NOISY, "data.sft.score.by=builtin", "data.sft.score.keep=80",
                  "data.sft.score.balance=task")  # fmt: skip
    run_pipeline(cfg)
    scored = _report(tmp_path / "run")["score"]
    assert scored["scored"] == 256 and scored["kept"] == 80
    assert scored["mean_kept_score"] == 1.0, "every kept reply is right"
    assert 0.5 < scored["mean_score"] < 0.7, "about 40% of the rows are wrong"
    assert {task: g["kept"] for task, g in scored["per_task"].items()} == dict.fromkeys(
        ("add", "reverse", "sort", "count"), 20
    )
    assert scored["highest_dropped"][0]["score"] == 1.0, "right replies beyond the count were dropped too"
    text = (tmp_path / "run" / "data_report.md").read_text()
    assert "scored by builtin: kept 80 of 256 rows (keep 80, balance task)" in text
    assert (tmp_path / "run" / "data_scores.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["status"] == "complete"

    # the same rows and scorer, another rule: every score comes from the cache, the stage key moves
    again = _config(tmp_path, cache_dir, *NOISY, "data.sft.score.by=builtin", "data.sft.score.min_score=1",
                    out="again")  # fmt: skip
    run_pipeline(again)
    scored = _report(tmp_path / "again")["score"]
    assert scored["computed"] == 0 and scored["from_cache"] == 256
    assert scored["kept"] == scored["per_task"]["add"]["kept"] + sum(
        g["kept"] for t, g in scored["per_task"].items() if t != "add"
    )
    first = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["key"]
    assert json.loads((tmp_path / "again" / "sft" / "manifest.json").read_text())["key"] != first


def test_an_rm_stage_scores_the_sft_rows_of_its_chain(tmp_path, cache_dir):
    run_pipeline(_config(tmp_path, cache_dir, *RM_FIRST))
    report = _report(tmp_path / "run")
    scored = report["score"]
    assert scored["by"] == "rm" and scored["scored"] == 256 and scored["kept"] == 128
    assert scored["computed"] == 256
    manifests = {s: json.loads((tmp_path / "run" / s / "manifest.json").read_text()) for s in ("rm", "sft")}
    assert all(m["status"] == "complete" for m in manifests.values())
    # the rm's scores are what ranked the rows: the kept ones score at least the dropped ones
    assert scored["lowest_kept"][0]["score"] >= scored["highest_dropped"][0]["score"]
    # the sft stage's key follows the rm's: another rm, other scores, another sft
    other = run_pipeline(_config(tmp_path, cache_dir, *RM_FIRST, "rm.learning_rate=1e-3", out="other"))
    assert other["stages"]["sft"]["status"] == "trained"
    assert _report(tmp_path / "other")["score"]["computed"] == 256


def test_a_scorer_that_is_not_an_earlier_rm_stage_is_refused_at_plan_time(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"^sft.data.score.by: 'rm' is not builtin.*an earlier rm stage"):
        _config(tmp_path, cache_dir, "data.sft.score.by=rm", "data.sft.score.keep=10")
    with pytest.raises(ConfigError, match=r"^sft.data.score.by: 'rm' is not .*\(none in this chain\)"):
        _config(tmp_path, cache_dir, *RM_FIRST, "run.stages=[sft,rm]")


def test_the_plan_says_how_each_stage_scores_its_rows(tmp_path, cache_dir):
    from posttrain.plan_report import plan_text
    from posttrain.stage_cache import stage_keys

    cfg = _config(tmp_path, cache_dir, "data.sft.score.by=builtin", "data.sft.score.keep=0.25",
                  "data.sft.score.balance=task")  # fmt: skip
    text = plan_text(cfg, stage_keys(cfg))
    assert "data builtin:sft [train] (scored by builtin: keep 0.25, balanced by task)" in text
    assert "data builtin:preference [train], lr" in text, "the unscored stage says nothing more"


def test_a_probe_stages_likelihood_scores_the_sft_rows_of_its_chain(tmp_path, cache_dir, capsys):
    from posttrain import models
    from posttrain.likelihood import LikelihoodScorer

    cfg = _config(tmp_path, cache_dir, *PROBE_FIRST)
    run_pipeline(cfg)
    scored = _report(tmp_path / "run")["score"]
    assert scored["by"] == "loss" and scored["scored"] == 256 and scored["kept"] == 128
    assert scored["computed"] == 256 and scored["mean_kept_score"] > scored["mean_score"]
    # the scores are the probe's own: the lowest kept row scored again under the saved probe
    lowest = scored["lowest_kept"][0]
    tokenizer = models.load_tokenizer(str(tmp_path / "run" / "probe"), cfg.model)
    again = LikelihoodScorer("loss", str(tmp_path / "run" / "probe"), cfg.model, tokenizer)
    assert abs(again([lowest["prompt"]], [lowest["reply"]])[0] - lowest["score"]) < 1e-3
    # another probe, other scores, another sft; the same probe again: every score from the cache
    other = run_pipeline(_config(tmp_path, cache_dir, *PROBE_FIRST, "probe.learning_rate=1e-3", out="other"))
    assert other["stages"]["sft"]["status"] == "trained"
    assert _report(tmp_path / "other")["score"]["computed"] == 256
    capsys.readouterr()
    same = run_pipeline(_config(tmp_path, cache_dir, *PROBE_FIRST, "data.sft.score.keep=0.25", out="same"))
    assert same["stages"]["probe"]["status"] == "reused"
    assert _report(tmp_path / "same")["score"]["from_cache"] == 256
    # another rule leaves the held-out rows alone: neither the base nor the probe is evaluated again
    logged = capsys.readouterr().out
    assert "base model metrics reused" in logged and "evaluating the reused model again" not in logged


def test_the_base_models_likelihood_scores_the_rows_of_the_first_stage(tmp_path, cache_dir):
    """`score.model: base` (the default): the rows are scored under the base model, after its evaluation."""
    from posttrain import models
    from posttrain.likelihood import LikelihoodScorer

    cfg = _config(tmp_path, cache_dir, *NOISY, "data.sft.score.by=loss", "data.sft.score.keep=0.5")
    run_pipeline(cfg)
    scored = _report(tmp_path / "run")["score"]
    assert scored["by"] == "loss" and scored["scored"] == 256 and scored["kept"] == 128
    base = models.base_model_source(cfg.model, cfg.run.cache_path)
    lowest = scored["lowest_kept"][0]
    again = LikelihoodScorer("loss", base, cfg.model, models.load_tokenizer(base, cfg.model))
    assert abs(again([lowest["prompt"]], [lowest["reply"]])[0] - lowest["score"]) < 1e-3


def test_a_likelihood_scorers_model_must_be_an_earlier_causal_lm(tmp_path, cache_dir):
    not_before = r"^sft.data.score.model: '{}' is not a causal LM before 'sft'; allowed: base$"
    with pytest.raises(ConfigError, match=not_before.format("probe")):
        _config(tmp_path, cache_dir, *PROBE_FIRST, "run.stages=[sft,probe]")
    with pytest.raises(ConfigError, match=not_before.format("rm")):
        _config(tmp_path, cache_dir, *RM_FIRST, "data.sft.score.by=loss", "data.sft.score.model=rm")
    with pytest.raises(ConfigError, match=r"^sft.data.score.model: 'probe' is read only by a likelihood scorer"):
        _config(tmp_path, cache_dir, *PROBE_FIRST, "data.sft.score.by=builtin")


def test_balance_by_source_keeps_each_sources_share_of_a_mixture(tmp_path, cache_dir):
    """Two files, one all right and three times as big, one all wrong: unbalanced, the checker keeps
    only the right file's rows; balanced by source, each file keeps its share of the count."""
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    right.write_text("".join(_row(f"What is {a} + 1?", str(a + 1)) for a in range(90)))
    wrong.write_text("".join(_row(f"What is {a} + 2?", str(a + 5)) for a in range(30)))
    sources = f"+data.sft.sources=[{{path: {right}}}, {{path: {wrong}}}]"
    mixed = [*NOISY, "data.sft.path=null", sources, "data.sft.score.by=builtin", "data.sft.score.keep=40"]
    run_pipeline(_config(tmp_path, cache_dir, *mixed))
    unbalanced = _report(tmp_path / "run")["score"]["per_source"]
    assert [g["kept"] for g in unbalanced.values()] == [40, 0]
    run_pipeline(_config(tmp_path, cache_dir, *mixed, "data.sft.score.balance=source", out="balanced"))
    balanced = _report(tmp_path / "balanced")["score"]
    sizes = [g["scored"] for g in balanced["per_source"].values()]
    assert [g["kept"] for g in balanced["per_source"].values()] == [round(40 * n / sum(sizes)) for n in sizes]
    assert balanced["from_cache"] == balanced["scored"], "the same rows and scorer: scored once"


def _row(prompt: str, reply: str) -> str:
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return json.dumps({"messages": turns}) + "\n"
