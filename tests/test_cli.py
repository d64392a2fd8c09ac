"""The command line: help, composed config, plan, and one-line errors (no training here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ANY_MODEL


def posttrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_groups_and_recipes():
    proc = posttrain("--help")
    assert proc.returncode == 0
    assert "align: cpo, dpo, grpo, ipo, kto, none, orpo, rm, simpo" in proc.stdout
    assert "pairs: onpolicy" in proc.stdout
    recipes = (
        "qwen2_5_0_5b_sft_orpo, smollm2_rm_sft_dpo, smollm2_self_curated_sft, smollm2_sft, smollm2_sft_dpo, "
        "smollm2_sft_grpo, tiny_sft_dpo, tiny_sft_grpo, tiny_sft_onpolicy_dpo, tiny_sft_orpo, zephyr_sft_dpo"
    )
    assert f"recipe: {recipes}" in proc.stdout


def test_help_shows_the_config_with_overrides_applied():
    proc = posttrain("align=orpo", "-h")
    assert proc.returncode == 0, proc.stderr
    assert "== Config ==" in proc.stdout and "method: orpo" in proc.stdout


def test_cfg_job_prints_the_composed_config():
    proc = posttrain("--cfg", "job", "align=orpo", "align.beta=0.2")
    assert proc.returncode == 0
    assert "method: orpo" in proc.stdout and "beta: 0.2" in proc.stdout


def test_plan_prints_the_chain_and_trains_nothing(tmp_path):
    proc = posttrain("plan=true", f"run.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert "sft: sft from base, data builtin:sft [train]" in proc.stdout and "align: dpo from sft" in proc.stdout
    assert not (tmp_path / "run" / "sft").exists()


def test_plan_of_sft_alone_plans_one_stage_in_one_try(tmp_path):
    proc = posttrain("plan=true", "run.stages=[sft]", f"run.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    stages = proc.stdout.split("stages:\n")[1]
    assert stages.startswith("  sft: sft from base") and "align" not in stages
    assert "note: sweep.objective: align does not run; runs are ranked by sft.exact_match" in proc.stdout


def test_plan_shows_a_mixture_with_its_weights(tmp_path):
    sources = "[{path: builtin:sft, weight: 3}, {path: builtin:sft, split: test, rows: 50}]"
    proc = posttrain("plan=true", "data.sft.path=null", f"+data.sft.sources={sources}")
    assert proc.returncode == 0, proc.stderr
    assert "data builtin:sft [train] x3 + builtin:sft [test] 50 rows," in proc.stdout


def test_bad_value_is_one_line_on_stderr():
    proc = posttrain("plan=true", "align.method=ppo")
    assert proc.returncode != 0
    allowed = "none, sft, dpo, orpo, kto, cpo, simpo, rm, pairs, grpo"
    assert proc.stderr.strip() == f"error: align.method: unknown method 'ppo'; allowed: {allowed}"


ALIGN_OPTIONS = "cpo, dpo, grpo, ipo, kto, none, orpo, rm, simpo"


@pytest.mark.parametrize(
    "override, message",
    [
        ("align=orpoo", "align=orpoo: no such option of align; allowed: " + ALIGN_OPTIONS),
        ("sft=default,nope", "sft=nope: no such option of sft; allowed: default, none"),  # a sweep's values
        ("+pairs@pairs=on", "pairs=on: no such option of pairs; allowed: onpolicy"),
        (
            "hydra/sweeper=optuan",
            "hydra/sweeper=optuan: no such option of hydra/sweeper; allowed: basic, optuna, posttrain_optuna",
        ),
    ],
)
def test_unknown_option_of_a_config_group_is_one_line_with_the_allowed_ones(override, message):
    proc = posttrain("plan=true", override)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {message}"


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['posttrain', '--help']\n"
        "from posttrain.cli import main\n"
        "try: main()\n"
        "except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("False")


def test_unknown_trainer_arg_is_caught_at_plan_time():
    proc = posttrain("plan=true", "+sft.trainer_args.warmup_ratoi=0.1")
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: sft.trainer_args.warmup_ratoi: not a field of TRL's SFTConfig"


def test_a_hub_model_that_is_neither_reachable_nor_cached_stops_the_run_at_plan_time(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")  # an empty hub cache
    argv = [
        sys.executable,
        "-m",
        "posttrain.cli",
        ANY_MODEL,
        "model=qwen2_5_0_5b",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "error: model.path: 'Qwen/Qwen2.5-0.5B' is not in the local hub cache and the hub cannot be reached "
        "(HF_HUB_OFFLINE=1); download it first (huggingface-cli download Qwen/Qwen2.5-0.5B) or give a folder"
    )
    plan = subprocess.run([*argv, "plan=true"], capture_output=True, text=True, timeout=300, env=env)
    assert plan.returncode == 0, plan.stderr
    assert "note: model.path: 'Qwen/Qwen2.5-0.5B' is not in the local hub cache" in plan.stdout


def test_sweep_gives_each_job_its_own_run_folder(tmp_path):
    proc = posttrain("-m", "align.beta=0.1,0.2", "plan=true", f"run.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert f"run folder: {tmp_path / '0'}" in proc.stdout and f"run folder: {tmp_path / '1'}" in proc.stdout


def test_run_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args in (["plan=true"], ["-m", "align.beta=0.1,0.2"]):
        proc = posttrain(*args, f"run.output_dir={blocker}/run")
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            f"error: run.output_dir: cannot create {blocker}/run: {blocker} is not a writable folder"
        )


def test_show_without_a_run_folder_says_what_is_wrong(tmp_path):
    proc = posttrain("show", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path}: holds no posttrain stages (no manifest.json in its folders)"


def test_slurm_sweep_launcher_composes():
    proc = posttrain("hydra/launcher=posttrain_slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    launcher = proc.stdout.split("\n  launcher:\n", 1)[1]
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in launcher
    assert "partition: gpu" in launcher and "max_num_timeout: 3" in launcher


@pytest.fixture
def small_mount(tmp_path):
    """A 64 KiB tmpfs (root and mount(8) needed), unmounted afterwards."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("args", [["plan=true"], [], ["-m", "align.beta=0.1,0.2"]])
def test_a_run_folder_on_a_pseudo_file_system_is_one_line_before_hydra_makes_it(args):
    line = _one_error_line(posttrain(*args, "run.output_dir=/proc/posttrain-run"))
    assert line == (
        "error: run.output_dir: cannot create /proc/posttrain-run: /proc is not a writable folder "
        "(No such file or directory)"
    )


def test_a_cache_on_a_pseudo_file_system_is_one_line(tmp_path):
    line = _one_error_line(posttrain("plan=true", f"run.output_dir={tmp_path / 'run'}", "run.cache_dir=/proc/x"))
    assert line.startswith("error: run.cache_dir: cannot create /proc/x: /proc is not a writable folder")


def test_a_full_disk_is_one_line_before_any_work(small_mount):
    (small_mount / "filler").write_bytes(b"\0" * 64 * 1024)  # as much as fits
    line = _one_error_line(posttrain(f"run.output_dir={small_mount / 'run'}"))
    assert line.startswith(f"error: run.output_dir: cannot create {small_mount / 'run'}: {small_mount} is not")
    assert "No space left on device" in line


def test_a_read_only_file_system_is_one_line(small_mount, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    line = _one_error_line(posttrain(f"run.output_dir={tmp_path / 'run'}", f"run.cache_dir={small_mount / 'cache'}"))
    assert line.endswith("is not a writable folder (Read-only file system)")


def test_a_file_in_the_way_of_a_stage_folder_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sft").write_text("not a folder")
    line = _one_error_line(posttrain("plan=true", f"run.output_dir={tmp_path / 'run'}"))
    assert line == (
        f"error: run.output_dir: {tmp_path / 'run' / 'sft'} is a file in the way of stage sft's folder; "
        "move it or choose another run.output_dir"
    )
