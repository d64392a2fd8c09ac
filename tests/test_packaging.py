"""A non-editable install finds conf/ and recipes/ (shipped as package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_wheel_install_finds_configs_and_recipes(tmp_path):
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # build from a copy: setuptools leaves build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(".*", "outputs", "build", "*.egg-info"))
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*build, str(wheels)], check=True, cwd=tmp_path, timeout=300)
    wheel = next(wheels.glob("posttrain-*.whl"))
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [sys.executable, "-m", "posttrain.cli"]
    where = subprocess.run(
        [sys.executable, "-c", "import posttrain.cli as c; print(c.__file__, c.config_dir())"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout  # fmt: skip
    assert where.split()[1].startswith(str(target)), where
    proc = subprocess.run(
        [*run, "plan=true", "recipe=tiny_sft_orpo"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "align: orpo from sft" in proc.stdout
