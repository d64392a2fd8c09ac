"""Online alignment through the pipeline on a few steps: on-policy pairs -> DPO and GRPO change
the weights and write complete manifests, a user's reward function is called by import path,
and an interrupted pairs stage resumes to the same pairs as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import artifacts, launch
from posttrain.data.builtin import task_of
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from posttrain.preemption import Preempted
from tests.conftest import FAST, compose_tree, user_module

PAIRS = [
    "+pairs@pairs=onpolicy",
    "run.stages=[sft,pairs,align]",
    "align.data={path:'stage:pairs'}",
    "pairs.num_prompts=32",
    "pairs.num_eval_prompts=16",
    "pairs.num_samples=4",
    "pairs.max_new_tokens=12",
    "pairs.generation_batch_size=8",
    "pairs.checkpoint_steps=0",
]
GRPO = [
    "align=grpo",
    "align.max_steps=3",
    "align.per_device_train_batch_size=16",
    "align.num_generations=4",
    "align.max_completion_length=12",
    "align.learning_rate=1e-3",
    "align.logging_steps=1",
]


def _run(tmp_path: Path, cache_dir: Path, *overrides: str, out: str = "run") -> tuple[dict, Path]:
    folder = tmp_path / out
    tree = compose_tree([*FAST, *overrides, f"run.output_dir={folder}", f"run.cache_dir={cache_dir}"])
    return run_pipeline(load_config(tree)), folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _changed(before: Path, after: Path) -> list[str]:
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """`my_rewards` on sys.path: the built-in checker (shorter replies break ties) that records
    its calls, and stops the run (through the stop file) at its third call when STOP_FILE is set."""
    user_module(
        tmp_path,
        monkeypatch,
        "my_rewards",
        """
            import json, os, pathlib
            from posttrain.rewards import builtin_reward
            CALLS = pathlib.Path(__file__).with_name("calls.jsonl")

            def checked(prompts, completions):
                with CALLS.open("a") as f:
                    f.write(json.dumps({"prompts": prompts, "completions": completions}) + "\\n")
                if os.environ.get("STOP_FILE") and len(CALLS.read_text().splitlines()) == 3:
                    stop = pathlib.Path(os.environ["STOP_FILE"])
                    stop.parent.mkdir(parents=True, exist_ok=True)
                    stop.touch()
                # the checker, and among equals the shorter reply (a model after a few SFT steps is
                # never right, and all ties give no pair)
                exact = builtin_reward(prompts, completions)
                return [e - len(c) / 100 for e, c in zip(exact, completions)]
            """,
    )
    return tmp_path / "calls.jsonl"


def test_onpolicy_pairs_then_dpo(tmp_path, cache_dir, user_rewards):
    summary, out = _run(tmp_path, cache_dir, *PAIRS, "pairs.reward=my_rewards:checked")
    assert summary["status"] == "complete"
    pairs, align, sft = (_manifest(out / name) for name in ("pairs", "align", "sft"))
    assert pairs["status"] == align["status"] == "complete"
    # the pairs stage wrote data, listed in its manifest with sizes, and no model
    assert artifacts.damage(out / "pairs", pairs) is None
    assert {"pairs/train.jsonl", "pairs/test.jsonl", "pairs/samples-train.jsonl"} <= set(pairs["files"])
    assert not (out / "pairs" / "model.safetensors").exists()
    samples = [json.loads(line) for line in (out / "pairs" / "pairs" / "samples-train.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "pairs" / "pairs" / "train.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and all(len(s["replies"]) == 4 for s in samples)
    # beside each reply: whether it was cut at max_new_tokens, and its entropy; the metrics average them
    cut, entropy = [c for s in samples for c in s["cut"]], [e for s in samples for e in s["entropy"]]
    assert len(cut) == len(entropy) == 128 and all(e > 0 for e in entropy)
    assert pairs["metrics"]["clipped_ratio"] == pytest.approx(sum(cut) / 128)
    assert pairs["metrics"]["entropy"] == pytest.approx(sum(entropy) / 128)
    # prompts whose non-empty replies are not all tied
    scored = [[x for r, x in zip(s["replies"], s["scores"], strict=True) if r] for s in samples]
    untied = [(s, xs) for s, xs in zip(samples, scored, strict=True) if xs and max(xs) > min(xs)]
    assert 0 < len(rows) == len(untied) == pairs["metrics"]["pairs"]
    assert pairs["metrics"]["ties_skipped"] == 32 - len(rows)
    assert [r["prompt"] for r in rows] == [s["prompt"] for s, _ in untied]
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(max(xs), min(xs)) for _, xs in untied]
    # the DPO stage trained on those pairs, from the SFT model (the pairs stage passes it on)
    assert align["parent"]["source"] == str(out / "sft")
    assert align["data"]["train_rows"] == len(rows) and "pairs" in align["data"]["origin"]
    assert align["data"]["fingerprint"] != sft["data"]["fingerprint"]
    assert _changed(out / "sft", out / "align")
    assert summary["stages"]["pairs"]["metrics"]["pairs"] == len(rows)
    # the same command again reuses every stage
    again, _ = _run(tmp_path, cache_dir, *PAIRS, "pairs.reward=my_rewards:checked")
    assert [s["status"] for s in again["stages"].values()] == ["base", "reused", "reused", "reused"]


def test_grpo_with_a_user_reward_function(tmp_path, cache_dir, user_rewards):
    summary, out = _run(tmp_path, cache_dir, *GRPO, "align.reward=my_rewards:checked")
    manifest = _manifest(out / "align")
    assert manifest["status"] == "complete" and manifest["method"] == "grpo"
    assert artifacts.damage(out / "align", manifest) is None
    assert _changed(out / "sft", out / "align")
    calls = [json.loads(line) for line in user_rewards.read_text().splitlines()]
    assert len(calls) == 3  # one call per step: 4 prompts x 4 replies
    for call in calls:
        assert len(call["prompts"]) == len(call["completions"]) == 16
        assert all(isinstance(p, str) and p.split()[0] in ("What", "Reverse", "Sort", "How") for p in call["prompts"])
        assert all(isinstance(c, str) for c in call["completions"])
        assert len(set(call["prompts"])) == 4  # 4 prompts, each repeated for its group
    # max_steps keeps the 3 x 4 prompts its steps read, and they last to the end: none repeats
    assert manifest["data"]["train_rows"] == 12 and len({p for c in calls for p in c["prompts"]}) == 12
    metrics = summary["stages"]["align"]["metrics"]
    assert {"train_reward_first", "train_reward", "exact_match"} <= set(metrics)
    logged = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/my_rewards:checked/mean" in record for record in logged)


def test_grpo_sums_weighted_rewards_as_trl_does_and_logs_what_explains_its_signal(tmp_path, cache_dir, user_rewards):
    """Two reward sources with weights: each is logged on its own, and every logged reward is their
    weighted sum; beside it the share of groups with equal rewards, entropy, the share of replies
    cut at max_completion_length and each built-in task's sampled reward."""
    overrides = ["align.reward=[builtin_partial,my_rewards:checked]", "align.reward_weights=[1.0,0.3]"]
    summary, out = _run(tmp_path, cache_dir, *GRPO, *overrides)
    logged = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "reward" in r]
    assert len(steps) == 3
    for record in steps:
        partial, checked = record["rewards/builtin_partial/mean"], record["rewards/my_rewards:checked/mean"]
        assert record["reward"] == pytest.approx(1.0 * partial + 0.3 * checked, abs=1e-6)
        assert 0 <= record["frac_reward_zero_std"] <= 1 and record["entropy"] > 0
        assert 0 <= record["completions/clipped_ratio"] <= 1
        tasks = {k.removeprefix("rewards/task/") for k in record if k.startswith("rewards/task/")}
        assert tasks and tasks <= {"add", "reverse", "sort", "count"}
    metrics = summary["stages"]["align"]["metrics"]
    assert metrics["train_reward_first"] == steps[0]["reward"] and metrics["train_reward"] == steps[-1]["reward"]


def test_band_filtering_trains_only_on_prompts_with_mixed_rewards(tmp_path, cache_dir, monkeypatch):
    """A reward whose pass rate per task is known (add never passes, reverse always, sort and
    count half the time): the band [0.1, 0.9] keeps exactly the sort and count prompts of the
    scored pool, every group GRPO then trains on has mixed rewards, and the share kept is logged."""
    user_module(
        tmp_path,
        monkeypatch,
        "rated_rewards",
        """
            import json, pathlib
            from posttrain.data.builtin import task_of
            CALLS = pathlib.Path(__file__).with_name("rated_calls.jsonl")
            RATES = {"add": 0.0, "reverse": 1.0, "sort": 0.5, "count": 0.5}

            def rated(prompts, completions):
                with CALLS.open("a") as f:
                    f.write(json.dumps(prompts) + "\\n")
                seen = {}
                scores = []
                for p in prompts:
                    seen[p] = seen.get(p, 0) + 1
                    scores.append(float(seen[p] <= RATES[task_of(p)] * prompts.count(p)))
                return scores
            """,
    )
    band = "align.band={low: 0.1, high: 0.9, samples: 2, pool: 48, every: 100}"
    summary, out = _run(tmp_path, cache_dir, *GRPO, "align.reward=rated_rewards:rated", band)
    assert summary["status"] == "complete"
    calls = [json.loads(line) for line in (tmp_path / "rated_calls.jsonl").read_text().splitlines()]
    scoring, training = calls[0], calls[1:]
    assert len(scoring) == 2 * 48 and all(scoring.count(p) == 2 for p in scoring)
    pool = list(dict.fromkeys(scoring))
    mixed = {p for p in pool if task_of(p) in ("sort", "count")}
    assert len(training) == 3 and mixed
    for call in training:  # 4 prompts x 4 replies per step, every prompt from the band
        assert len(call) == 16 and set(call) <= mixed
    logged = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["band/kept_share"] for r in logged if "band/kept_share" in r]
    assert shares and shares[0] == pytest.approx(len(mixed) / len(pool))
    assert all(r["frac_reward_zero_std"] == 0 for r in logged if "frac_reward_zero_std" in r)


def test_an_interrupted_pairs_stage_resumes_to_the_same_pairs(tmp_path, cache_dir, user_rewards, monkeypatch):
    stop = launch.stop_file(tmp_path / "run")  # what `posttrain` writes when it is signalled
    monkeypatch.setenv("STOP_FILE", str(stop))
    # temperature 0.9: not the pairs stage the first test left complete in the session cache
    overrides = [*PAIRS, "pairs.reward=my_rewards:checked", "pairs.temperature=0.9", "align.max_steps=2"]
    with pytest.raises(Preempted):
        _run(tmp_path, cache_dir, *overrides)
    out = tmp_path / "run"
    interrupted = _manifest(out / "pairs")
    assert interrupted["status"] == "interrupted" and interrupted["checkpoint"].endswith("checkpoint-3")
    assert len((out / "pairs" / "pairs" / "samples-train.jsonl").read_text().splitlines()) == 24
    stop.unlink()
    monkeypatch.delenv("STOP_FILE")
    summary, _ = _run(tmp_path, cache_dir, *overrides)
    assert summary["stages"]["pairs"]["status"] == "resumed"
    # an uninterrupted run of the same stage, in another folder, writes the same pairs
    fresh, other = _run(tmp_path, cache_dir, *overrides, "run.reuse=false", out="fresh")
    assert fresh["stages"]["pairs"]["status"] == "trained"
    for name in ("train.jsonl", "test.jsonl", "samples-train.jsonl"):
        assert (out / "pairs" / "pairs" / name).read_text() == (other / "pairs" / "pairs" / name).read_text()
