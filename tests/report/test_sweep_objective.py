"""The sweep report ranks runs by the objective their config resolved (plan.chain_objective)."""

from __future__ import annotations

from posttrain.report.sweep import ranked_objective


def _run(sweep_dir, job: int, objective: str) -> None:
    folder = sweep_dir / str(job)
    folder.mkdir(parents=True)
    (folder / "resolved.yaml").write_text(f"sweep:\n  objective: {objective}\n")


def test_the_runs_resolved_objective_ranks_them_when_they_agree(tmp_path):
    for job in range(2):
        _run(tmp_path / "sft_only", job, "sft.exact_match")  # align.exact_match moved: align did not run
    assert ranked_objective(tmp_path / "sft_only", "align.exact_match") == "sft.exact_match"
    _run(tmp_path / "mixed", 0, "sft.exact_match")
    _run(tmp_path / "mixed", 1, "align.exact_match")
    assert ranked_objective(tmp_path / "mixed", "align.exact_match") == "align.exact_match"
    assert ranked_objective(tmp_path / "empty", "align.exact_match") == "align.exact_match"
