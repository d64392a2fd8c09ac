"""Precomputed DPO reference log-probs: equal to TRL's own, saved beside the reference, reused."""

from __future__ import annotations

import pytest

from posttrain import models
from posttrain.config import DataSource, ModelConfig
from posttrain.data.builtin import TaskSpec, write_tasks
from posttrain.data.load import load_stage_data
from posttrain.ref_logps import RefLogpsCache, rows_digest
from posttrain.stages import STAGES
from posttrain.stages.base import TrainerInputs

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    cfg = ModelConfig()
    source = models.base_model_source(cfg, folder / "cache")
    tasks = write_tasks(TaskSpec(num_sft=8, num_preference=48, num_test=8), folder / "tasks")
    data = load_stage_data(DataSource(path="builtin:preference"), "preference", tasks, seed=0)
    return folder, cfg, source, models.load_tokenizer(source, cfg), data


def dpo_trainer(setup, cache: RefLogpsCache | None, tmp_path, **more_args):
    folder, cfg, source, tokenizer, data = setup
    stage = STAGES["dpo"].config_cls(method="dpo", max_length=64, per_device_train_batch_size=8)
    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        max_length=64, use_cpu=True, report_to="none", max_steps=1, disable_tqdm=True, **more_args,
    )  # fmt: skip
    inputs = TrainerInputs(
        cfg=stage, model=models.load_model(source, cfg), ref_model=None, tokenizer=tokenizer,
        train_dataset=data.train, eval_dataset=data.eval, args=args, peft_config=None, ref_logps=cache,
    )  # fmt: skip
    return STAGES["dpo"].make_trainer(inputs)


def logps(trainer, split="train"):
    dataset = trainer.train_dataset if split == "train" else trainer.eval_dataset
    return [dataset[c] for c in COLUMNS]


def test_cached_reference_logps_equal_freshly_computed_ones_and_are_reused(setup, tmp_path):
    fresh = dpo_trainer(setup, None, tmp_path)  # TRL's own precompute, nothing kept
    cache = RefLogpsCache(tmp_path / "sft" / "ref_logps", "key-of-sft", "float32|sdpa|none")
    first = dpo_trainer(setup, cache, tmp_path)
    assert first.ref_logps_source == {"train": "computed", "eval": "computed"}
    assert sorted(p.name.split("-")[0] for p in cache.folder.glob("*.parquet")) == ["eval", "train"]
    again = dpo_trainer(setup, cache, tmp_path)
    assert again.ref_logps_source == {"train": "cache", "eval": "cache"}
    for split in ("train", "eval"):
        assert logps(first, split) == logps(fresh, split)
        assert logps(again, split) == logps(fresh, split)
    assert first.ref_model is None  # the policy, still equal to the reference, computed them


def test_rows_tokenized_in_two_processes_read_the_same_cached_logps(setup, tmp_path):
    # large datasets are tokenized in a pool (tokenization_processes): same rows, same cache file
    cache = RefLogpsCache(tmp_path / "ref_logps", "key-a", "float32|sdpa|none")
    one = dpo_trainer(setup, cache, tmp_path)
    two = dpo_trainer(setup, cache, tmp_path, dataset_num_proc=2)
    assert two.ref_logps_source == {"train": "cache", "eval": "cache"}
    assert two.train_dataset["chosen_ids"] == one.train_dataset["chosen_ids"]
    assert rows_digest(two.train_dataset) == rows_digest(one.train_dataset)


def test_the_same_rows_in_another_order_have_another_digest():
    """A shuffle is an indices mapping over the same arrow table: the digest (the cache file's
    name) must follow the rows' order, or log-probs cached in one order are read in another."""
    from datasets import Dataset

    rows = Dataset.from_dict({"prompt_ids": [[1, 2], [3], [4, 5, 6], [7]], "completion_ids": [[8], [9], [10], [11]]})
    shuffled = rows.shuffle(seed=0)
    assert shuffled["prompt_ids"] != rows["prompt_ids"]
    assert rows_digest(shuffled) != rows_digest(rows)
    assert rows_digest(shuffled) == rows_digest(shuffled.flatten_indices())


def test_another_reference_or_length_gets_its_own_logps(setup, tmp_path):
    cache = RefLogpsCache(tmp_path / "ref_logps", "key-a", "float32|sdpa|none")
    dpo_trainer(setup, cache, tmp_path)
    other = dpo_trainer(setup, RefLogpsCache(cache.folder, "key-b", cache.model_settings), tmp_path)
    assert other.ref_logps_source == {"train": "computed", "eval": "computed"}
    assert len(list(cache.folder.glob("train-*.parquet"))) == 2


def test_precomputed_logps_are_the_references_log_likelihood_of_each_reply(setup, tmp_path):
    """Recomputed by hand from a separately loaded reference: sum of log p(token) over the reply."""
    import torch

    _, cfg, source, _, _ = setup
    trainer = dpo_trainer(setup, RefLogpsCache(tmp_path / "r", "k", "s"), tmp_path)
    reference = models.load_model(source, cfg).eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    chosen, rejected = (token_logps * batch["completion_mask"][:, 1:]).sum(1).chunk(2)
    # TRL's fused, chunked LM head sums in another order: ~1e-4 relative in fp32 (a wrong mask is off by units)
    assert torch.allclose(chosen, batch["ref_chosen_logps"], rtol=1e-3)
    assert torch.allclose(rejected, batch["ref_rejected_logps"], rtol=1e-3)


def test_a_job_that_finds_the_same_log_probs_being_computed_waits_and_reads_them(setup, tmp_path, capsys):
    """Two sweep points over one reference: the second waits on the cache key's lock while the
    first computes, then reads the file it wrote instead of computing again."""
    import shutil
    import threading
    import time

    from posttrain.locks import FileLock

    cache = RefLogpsCache(tmp_path / "sft" / "ref_logps", "key-of-sft", "float32|sdpa|none")
    dpo_trainer(setup, cache, tmp_path)
    train_file = next(cache.folder.glob("train-*.parquet"))
    kept = tmp_path / "computed.parquet"
    shutil.move(train_file, kept)  # as if the first job were still computing them
    with FileLock(train_file.with_name(f"{train_file.name}.lock"), "the first job"):
        second: dict = {}
        thread = threading.Thread(target=lambda: second.update(trainer=dpo_trainer(setup, cache, tmp_path)))
        thread.start()
        deadline = time.time() + 60
        while "which computes the same reference log-probs" not in capsys.readouterr().out:
            assert thread.is_alive() and time.time() < deadline, "the second job did not wait"
            time.sleep(0.05)
        shutil.move(kept, train_file)  # the first job writes its file, then releases the lock
    thread.join(timeout=120)
    assert second["trainer"].ref_logps_source == {"train": "cache", "eval": "cache"}
