"""SFT -> DPO and SFT -> ORPO on the tiny model through the real `posttrain` command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import FAST, run_posttrain


def posttrain(*args: str, cache_dir) -> subprocess.CompletedProcess:
    return run_posttrain(*args, cache_dir=cache_dir)


@pytest.fixture(scope="module", params=["dpo", "orpo"])
def finished_run(request, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run-{request.param}") / "run"
    args = (f"align={request.param}", f"run.output_dir={out}", *FAST, "align.eval.judge=exact_match")
    proc = posttrain(*args, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, out, proc


def test_win_rate_over_the_parent_is_judged_on_the_same_prompts(finished_run):
    _, out, proc = finished_run
    sft = {r["prompt"]: r["correct"] for r in _manifest(out / "sft")["replies"]}
    align = {r["prompt"]: r["correct"] for r in _manifest(out / "align")["replies"]}
    assert sft.keys() == align.keys() and len(sft) == 16
    expected = sum(0.5 + 0.5 * (align[p] - sft[p]) for p in sft) / len(sft)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["align"]["metrics"]["win_rate_vs_parent"] == pytest.approx(expected)
    assert "win_rate" in proc.stdout and "win rate over sft by exact_match" in proc.stdout


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_every_stage_writes_a_complete_artifact(finished_run):
    method, out, _ = finished_run
    assert (out / "resolved.yaml").exists()
    sft, align = _manifest(out / "sft"), _manifest(out / "align")
    assert sft["status"] == align["status"] == "complete"
    assert (sft["method"], align["method"]) == ("sft", method)
    assert sft["parent"]["name"] == "base"
    assert align["parent"]["name"] == "sft" and align["parent"]["key"] == sft["key"]
    # the orpo run reuses the dpo run's SFT (same key, same cache): its `sft` links there
    assert Path(align["parent"]["source"]) == (out / "sft").resolve()
    # of the 128 preference rows, the 6 x 16 that align.max_steps reads (FAST)
    assert align["versions"]["trl"] and align["data"]["train_rows"] == 96
    for folder in (out / "sft", out / "align"):
        assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
        assert (folder / "metrics.jsonl").exists()
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_stage_changes_the_weights(finished_run):
    _, out, _ = finished_run
    base = _manifest(out / "sft")["parent"]["source"]
    w_base, w_sft, w_align = _weights(Path(base)), _weights(out / "sft"), _weights(out / "align")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w_base[name], w_sft[name])
    assert not torch.equal(w_sft[name], w_align[name])


def _losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_loss_falls(finished_run):
    _, out, _ = finished_run
    for stage in ("sft", "align"):
        losses = _losses(out / stage)
        assert len(losses) >= 3, stage
        assert losses[-1] < losses[0], (stage, losses)


def test_summary_has_metrics_of_every_stage(finished_run):
    method, out, proc = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["base", "sft", "align"]
    for stage in ("base", "sft", "align"):
        metrics = summary["stages"][stage]["metrics"]
        assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["response_loss"] > 0
    align = summary["stages"]["align"]["metrics"]
    assert 0.0 <= align["eval_rewards/accuracies"] <= 1.0
    assert summary["stages"]["sft"]["metrics"]["response_loss"] < summary["stages"]["base"]["metrics"]["response_loss"]
    assert "| stage" in proc.stdout and "reward_acc" in proc.stdout
    assert len(summary["samples"]) == 4 and set(summary["samples"][0]) >= {"prompt", "base", "sft", "align"}
    samples = (out / "samples.md").read_text().splitlines()
    assert samples[0] == "| prompt | reference | base | sft | align |" and len(samples) == 2 + 4


def test_final_model_loads_and_generates(finished_run):
    _, out, _ = finished_run
    model = AutoModelForCausalLM.from_pretrained(out / "align")
    tok = AutoTokenizer.from_pretrained(out / "align")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out_ids = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] > enc["input_ids"].shape[1]
    assert tok.chat_template and "{% generation %}" in tok.chat_template


def test_rerun_of_a_finished_run_reuses_every_stage(finished_run, cache_dir):
    method, out, _ = finished_run
    before = {stage: (out / stage / "manifest.json").read_text() for stage in ("sft", "align")}
    proc = posttrain(f"align={method}", f"run.output_dir={out}", *FAST, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing complete artifact" in proc.stdout and "starting from" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["base", "reused", "reused"]
    assert {stage: (out / stage / "manifest.json").read_text() for stage in before} == before


def test_changed_config_into_a_finished_folder_is_refused(finished_run, cache_dir):
    method, out, _ = finished_run
    before = (out / "align" / "manifest.json").read_text()
    proc = posttrain(f"align={method}", f"run.output_dir={out}", *FAST, "align.learning_rate=1e-4", cache_dir=cache_dir)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: run.output_dir: {out / 'align'} holds a complete stage made with a different config "
        "(changed: stage.learning_rate); finished stages are never overwritten: choose a new run.output_dir"
    )
    assert (out / "align" / "manifest.json").read_text() == before


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_lora_adapters_are_merged_into_plain_models(cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = posttrain("peft=lora", "peft.r=8", f"run.output_dir={out}", *FAST, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = Path(_manifest(out / "sft")["parent"]["source"])
    for stage in ("sft", "align"):
        assert _manifest(out / stage)["status"] == "complete"
        assert not (out / stage / "adapter_config.json").exists()
        weights = _weights(out / stage)
        assert not any("lora" in name for name in weights)
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(weights[name], _weights(parent)[name]), stage
        parent = out / stage


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_a_stage_starts_from_the_same_weights_whatever_ran_before_it_in_the_process(peft, cache_dir, tmp_path):
    """An rm stage's new score head (and, under LoRA, its adapter) are drawn at random: trained after
    an SFT in one process, or alone, the same key gives the same weights (a re-run that reuses
    earlier stages, or a chain resumed before the stage's first checkpoint, equals one run)."""
    from posttrain.pipeline import run_pipeline
    from posttrain.plan import load_config
    from tests.conftest import compose_tree

    rm = ["+align@rm=rm", "rm.init_from=base", "rm.max_steps=2", "rm.eval.num_prompts=4", f"peft={peft}"]

    def run(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        tree = compose_tree([*FAST, *rm, *overrides, f"run.output_dir={out}", f"run.cache_dir={cache_dir}"])
        assert run_pipeline(load_config(tree))["stages"]["rm"]["status"] == "trained"
        return _weights(out / "rm")

    after_sft = run("after-sft", "run.stages=[sft,rm]")
    alone = run("alone", "run.stages=[rm]", "run.reuse=false")
    assert after_sft.keys() == alone.keys() and any("score" in name for name in alone)
    for name, weight in alone.items():
        assert torch.equal(weight, after_sft[name]), name
