"""Every command the docs show in a block marked runnable (```bash { .runnable }) composes and
plans: each runs as `posttrain ... plan=true`, from the repository's root, into a fresh run folder.
Under `-m docs` (one process each: ~40 s, kept out of the default run's 8 minutes)."""

from __future__ import annotations

import shlex

import pytest

from tests.conftest import REPO, run_posttrain
from tests.docs.helpers import runnable_commands

pytestmark = pytest.mark.docs

COMMANDS = runnable_commands()


def test_the_pages_mark_commands_runnable():
    pages = {page for page, _ in COMMANDS}
    assert len(COMMANDS) >= 20 and {"getting-started.md", "your-data.md", "scale.md"} <= pages


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[10:60]}" for p, c in COMMANDS])
def test_a_runnable_command_plans(page, command, cache_dir, tmp_path):
    words = shlex.split(command)
    assert words[0] == "posttrain", f"{page}: a runnable block holds posttrain commands only: {command}"
    args = words[1:]
    if "plan=true" not in args:
        args.append("plan=true")
    # the run folder a page names (/tmp/x) becomes this test's own
    args = [a for a in args if not a.startswith("run.output_dir=")] + [f"run.output_dir={tmp_path / 'run'}"]
    proc = run_posttrain(*args, cache_dir=cache_dir, cwd=REPO)
    assert proc.returncode == 0, f"{page}: {command}\n{proc.stderr[-2000:]}"
    assert "stages:" in proc.stdout, proc.stdout[-2000:]
