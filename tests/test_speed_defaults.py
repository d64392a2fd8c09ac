"""Defaults chosen per machine: processes for tokenizing large datasets."""

from __future__ import annotations

import os

import pytest

from posttrain.stages import STAGES
from posttrain.stages.base import PARALLEL_TOKENIZATION_ROWS, tokenization_processes

CORES = len(os.sched_getaffinity(0))


def stage(method: str, **trainer_args):
    return STAGES[method].config_cls(method=method, trainer_args=trainer_args)


@pytest.mark.skipif(CORES < 2, reason="one core: never a pool")
def test_large_datasets_are_tokenized_on_every_core_of_this_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    rows = PARALLEL_TOKENIZATION_ROWS
    assert tokenization_processes(STAGES["sft"], stage("sft"), rows) == {"dataset_num_proc": min(CORES, 8)}
    assert tokenization_processes(STAGES["dpo"], stage("dpo"), rows) == {"dataset_num_proc": min(CORES, 8)}
    # small datasets: one process (a pool costs more than it saves)
    assert tokenization_processes(STAGES["sft"], stage("sft"), rows - 1) == {}
    # the user's own setting wins; GRPO's trainer has no such setting; data stages train nothing
    assert tokenization_processes(STAGES["sft"], stage("sft", dataset_num_proc=1), rows) == {}
    assert tokenization_processes(STAGES["grpo"], stage("grpo"), rows) == {}
    assert tokenization_processes(STAGES["pairs"], stage("pairs"), rows) == {}
    # as many ranks on this node as cores: each rank tokenizes alone
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(CORES))
    assert tokenization_processes(STAGES["sft"], stage("sft"), rows) == {}
