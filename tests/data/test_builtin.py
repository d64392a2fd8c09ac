"""The built-in task generator: deterministic, verifiable, held-out prompts kept out of training."""

from __future__ import annotations

import json
import random

from posttrain.data.builtin import TASKS, TaskSpec, write_tasks


def _rows(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_same_seed_same_files(tmp_path):
    spec = TaskSpec(num_sft=50, num_preference=30, num_test=20)
    a, b = write_tasks(spec, tmp_path / "a"), write_tasks(spec, tmp_path / "b")
    for name in ("sft/train.jsonl", "sft/test.jsonl", "preference/train.jsonl", "preference/test.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    other = write_tasks(TaskSpec(num_sft=50, num_preference=30, num_test=20, seed=1), tmp_path / "c")
    assert (other / "sft/train.jsonl").read_text() != (a / "sft/train.jsonl").read_text()


def test_held_out_prompts_never_in_train(tmp_path):
    folder = write_tasks(TaskSpec(num_sft=2000, num_preference=1000, num_test=100), tmp_path / "t")
    test_prompts = {r["messages"][0]["content"] for r in _rows(folder, "sft/test.jsonl")}
    train_prompts = {r["messages"][0]["content"] for r in _rows(folder, "sft/train.jsonl")}
    pref_prompts = {r["prompt"][0]["content"] for r in _rows(folder, "preference/train.jsonl")}
    assert len(test_prompts) > 90
    assert not test_prompts & train_prompts
    assert not test_prompts & pref_prompts


def test_answers_are_correct_and_rejected_are_near_misses(tmp_path):
    folder = write_tasks(TaskSpec(num_sft=10, num_preference=400, num_test=10), tmp_path / "t")
    tasks_seen = set()
    for row in _rows(folder, "preference/train.jsonl"):
        prompt = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        tasks_seen.add(row["task"])
        if row["task"] == "add":
            a, b = (int(x) for x in prompt.removeprefix("What is ").removesuffix("?").split(" + "))
            assert int(chosen) == a + b
            assert abs(int(rejected) - (a + b)) in (1, 2, 10)
        elif row["task"] == "reverse":
            assert chosen.split() == prompt.split(": ")[1].split()[::-1]
        elif row["task"] == "sort":
            assert chosen.split() == sorted(prompt.split(": ")[1].split())
            assert len(rejected.split()) == len(chosen.split())  # a swap or a neighbouring letter
        elif row["task"] == "count":
            assert int(chosen) == len(prompt.split(": ")[1].split())
    assert tasks_seen == set(TASKS)


def test_every_task_generates_its_answer():
    rng = random.Random(0)
    for name, make in TASKS.items():
        problem = make(rng, 5)
        assert problem.task == name and problem.answer != problem.wrong
