"""`posttrain show RUN_DIR` (posttrain/report/show.py) on run folders made by hand: stages in chain
order with their status (complete, running, crashed and resumable, interrupted, no manifest),
lineage, key, time and metrics; a run another process holds; a sweep folder of numbered runs; and
the messages for a wrong command line, a missing folder and a folder without stages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from posttrain.artifacts import MANIFEST, write_json_atomic
from posttrain.locks import FileLock
from posttrain.report.show import main

STARTED = 1_780_000_000.0


def write_run(run_dir: Path, stages: list[str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved.yaml").write_text(f"run:\n  name: test\n  stages: [{', '.join(stages)}]\n")
    return run_dir


def write_stage(run_dir: Path, name: str, status: str, **fields) -> Path:
    manifest = {
        "status": status,
        "stage": name,
        "method": fields.pop("method", "sft"),
        "key": fields.pop("key", f"{name}-key-0123456789abcdef"),
        "parent": {"name": fields.pop("parent", "base"), "key": "k", "source": "/models/base"},
        "attempts": fields.pop("attempts", [{"started": STARTED, "resumed_from": None}]),
        **fields,
    }
    write_json_atomic(run_dir / name / MANIFEST, manifest)
    return run_dir / name


def write_checkpoint(stage_dir: Path, step: int, state: str | None = None) -> None:
    folder = stage_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) if state is None else state)


def show(capsys, *argv: str) -> tuple[int | str, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def row(lines: list[str], stage: str) -> str:
    (line,) = [line for line in lines if line.split("  ", 1)[0] == stage]
    return line


def columns(lines: list[str], stage: str) -> dict[str, str]:
    """The row of `stage` split at the header's column starts."""
    header = next(line for line in lines if line.startswith("stage "))
    names = header.split()
    starts = [header.index(f"{n} " if n != names[-1] else n) for n in names]
    line = row(lines, stage)
    ends = [*starts[1:], None]
    return {n: line[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)}


@pytest.fixture
def complete_run(tmp_path) -> Path:
    run_dir = write_run(tmp_path / "run", ["sft", "align"])
    finished = [{"started": STARTED, "finished": STARTED + 90, "resumed_from": None}]
    sft_metrics = {"exact_match": 0.5, "train_loss": 1.23456}
    write_stage(run_dir, "sft", "complete", attempts=finished, metrics=sft_metrics)
    align_metrics = {"exact_match": 0.625, "eval_rewards/accuracies": 0.875, "eval_rewards/margins": 2}
    write_stage(run_dir, "align", "complete", method="dpo", parent="sft", attempts=finished, metrics=align_metrics)
    return run_dir


def test_a_complete_run_lists_its_stages_in_chain_order(complete_run, capsys):
    code, lines = show(capsys, str(complete_run))
    assert code == 0
    assert lines[0] == str(complete_run)
    assert lines[1].split() == [
        "stage",
        "method",
        "status",
        "key",
        "from",
        "started",
        "time",
        "exact_match",
        "train_loss",
        "reward_acc",
        "margin",
        "folder",
    ]
    assert [line.split("  ", 1)[0] for line in lines[2:]] == ["sft", "align"]


def test_a_complete_stage_shows_lineage_key_time_and_metrics(complete_run, capsys):
    _, lines = show(capsys, str(complete_run))
    sft, align = columns(lines, "sft"), columns(lines, "align")
    assert (sft["method"], sft["status"], sft["from"], sft["folder"]) == ("sft", "complete", "base", ".")
    assert sft["key"] == "sft-key-01"  # the first 10 characters
    assert sft["started"] == time.strftime("%Y-%m-%d %H:%M", time.localtime(STARTED))
    assert sft["time"] == "1.5 min"
    assert (sft["exact_match"], sft["train_loss"], sft["reward_acc"], sft["margin"]) == ("0.500", "1.235", "-", "-")
    assert (align["method"], align["from"]) == ("dpo", "sft")
    assert (align["exact_match"], align["train_loss"], align["reward_acc"], align["margin"]) == (
        "0.625",
        "-",
        "0.875",
        "2",
    )


def test_the_chain_order_comes_from_resolved_yaml(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", ["zeta", "alpha", "missing"])
    write_stage(run_dir, "alpha", "complete")
    write_stage(run_dir, "zeta", "complete")
    write_stage(run_dir, "other", "complete")  # not a stage of this chain
    _, lines = show(capsys, str(run_dir))
    assert [line.split("  ", 1)[0] for line in lines[2:]] == ["zeta", "alpha"]


def test_without_resolved_yaml_every_folder_with_a_manifest_is_a_stage(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_stage(run_dir, "sft", "complete")
    write_stage(run_dir, "align", "complete")
    (run_dir / "launch").mkdir()
    _, lines = show(capsys, str(run_dir))
    assert [line.split("  ", 1)[0] for line in lines[2:]] == ["align", "sft"]


def test_a_crashed_stage_is_resumable_from_its_last_whole_checkpoint(complete_run, capsys):
    align = write_stage(complete_run, "align", "running", method="dpo", parent="sft")
    write_checkpoint(align, 4)
    write_checkpoint(align, 6)
    write_checkpoint(align, 8, state='{"global_st')  # cut short by the crash
    code, lines = show(capsys, str(complete_run))
    assert code == 0
    assert columns(lines, "align")["status"] == "crashed, resumable from checkpoint-6"
    assert columns(lines, "align")["time"] == "-"  # no attempt finished
    assert columns(lines, "sft")["status"] == "complete"


def test_a_crashed_stage_without_a_checkpoint_starts_over(complete_run, capsys):
    write_stage(complete_run, "align", "running")
    _, lines = show(capsys, str(complete_run))
    assert columns(lines, "align")["status"] == "crashed"


def test_a_stage_of_a_run_in_progress_is_running(complete_run, capsys):
    write_checkpoint(write_stage(complete_run, "align", "running"), 2)
    with FileLock(complete_run / ".posttrain.lock", "run folder"):
        _, lines = show(capsys, str(complete_run))
    assert lines[0] == f"{complete_run}  (in use by a running posttrain)"
    assert columns(lines, "align")["status"] == "running"


def test_an_interrupted_stage_names_its_checkpoint(complete_run, capsys):
    checkpoint = complete_run / "align" / "checkpoints" / "checkpoint-12"
    write_stage(complete_run, "align", "interrupted", checkpoint=str(checkpoint))
    _, lines = show(capsys, str(complete_run))
    assert columns(lines, "align")["status"] == "interrupted at checkpoint-12"


def test_failed_and_resumed_stages(complete_run, capsys):
    write_stage(complete_run, "sft", "failed", error="RuntimeError: boom")
    attempts = [
        {"started": STARTED, "resumed_from": None},
        {"started": STARTED + 600, "finished": STARTED + 600 + 30, "resumed_from": "checkpoint-4"},
    ]
    write_stage(complete_run, "align", "complete", attempts=attempts)
    _, lines = show(capsys, str(complete_run))
    assert columns(lines, "sft")["status"] == "failed"
    assert columns(lines, "align")["time"] == "0.5 min (2 attempts)"
    assert columns(lines, "align")["started"] == time.strftime("%Y-%m-%d %H:%M", time.localtime(STARTED))


def test_the_time_of_a_stage_counts_its_interrupted_attempts(complete_run, capsys):
    attempts = [
        {"started": STARTED, "ended": STARTED + 600, "resumed_from": None},  # preempted after 10 minutes
        {"started": STARTED + 900, "finished": STARTED + 900 + 30, "resumed_from": "checkpoint-4"},
    ]
    write_stage(complete_run, "align", "complete", attempts=attempts)
    _, lines = show(capsys, str(complete_run))
    assert columns(lines, "align")["time"] == "10.5 min (2 attempts)"


def test_a_stage_folder_without_a_manifest(complete_run, capsys):
    (complete_run / "align" / MANIFEST).unlink()
    _, lines = show(capsys, str(complete_run))
    align = columns(lines, "align")
    assert (align["method"], align["status"], align["key"], align["exact_match"]) == ("?", "no manifest", "-", "-")


def test_a_reused_stage_links_to_its_folder(complete_run, tmp_path, capsys):
    elsewhere = tmp_path / "cache" / "stages" / "sft-0123"
    write_stage(elsewhere.parent, elsewhere.name, "complete", metrics={"exact_match": 0.5})
    (complete_run / "sft" / MANIFEST).unlink()
    (complete_run / "sft").rmdir()
    (complete_run / "sft").symlink_to(elsewhere, target_is_directory=True)
    _, lines = show(capsys, str(complete_run))
    assert row(lines, "sft").endswith(f"-> {elsewhere.resolve()}")
    assert columns(lines, "sft")["status"] == "complete"


def test_a_sweep_folder_shows_its_numbered_runs_in_order_and_its_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for number in ("0", "1", "2", "10"):
        write_stage(write_run(sweep / number, ["sft"]), "sft", "complete", metrics={"exact_match": int(number) / 100})
    (sweep / "sweep.md").write_text("| run | align.exact_match |\n\nbest: run 10\n")
    code, lines = show(capsys, str(sweep))
    assert code == 0
    titles = [line for line in lines if line.startswith(str(sweep))]
    assert titles == [str(sweep / n) for n in ("0", "1", "2", "10")]
    exact_match = [line.split()[-5] for line in lines if line.startswith("sft ")]  # 5th from the end
    assert exact_match == ["0.000", "0.010", "0.020", "0.100"]
    assert lines[-3:] == ["| run | align.exact_match |", "", "best: run 10"]


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"], ["a", "b"]])
def test_a_wrong_command_line_returns_the_usage(argv, capsys):
    assert main(argv).startswith("usage: posttrain show RUN_DIR")
    assert capsys.readouterr().out == ""


def test_a_missing_folder_is_an_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing)]) == f"error: {missing}: no such run folder"
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path / "file")]) == f"error: {tmp_path / 'file'}: no such run folder"
    assert capsys.readouterr().out == ""


def test_a_folder_without_stages_is_an_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    expected = f"error: {tmp_path / 'empty'}: holds no posttrain stages (no manifest.json in its folders)"
    assert main([str(tmp_path / "empty")]) == expected
    write_run(tmp_path / "unstarted", ["sft", "align"])  # resolved.yaml, but no stage folder yet
    assert main([str(tmp_path / "unstarted")]).startswith(f"error: {tmp_path / 'unstarted'}: holds no posttrain")
    assert capsys.readouterr().out == ""
