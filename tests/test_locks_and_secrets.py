"""Locks that a crashed holder cannot leave behind; secrets never written to files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from posttrain.locks import FileLock, LockedError
from posttrain.secrets import redact, scrub_file

HOLD = """
import sys, time
from pathlib import Path
from posttrain.locks import FileLock
with FileLock(Path(sys.argv[1]), "run folder"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_lock_names_its_holder_and_a_killed_holder_releases_it(tmp_path):
    path = tmp_path / "run" / ".posttrain.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"run folder {tmp_path / 'run'} is in use by pid {holder.pid} on "):
            with FileLock(path, "run folder"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FileLock(path, "run folder"):  # the lock file is still there; the lock is not
        assert path.exists()


def test_a_waiting_lock_is_taken_once_the_holder_ends(tmp_path):
    path = tmp_path / "stage.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waited = []
    subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
    start = time.time()
    with FileLock(path, "stage sft", wait=True, on_wait=waited.append):
        assert time.time() - start >= 0.5
    holder.wait()
    assert waited and f"pid {holder.pid}" in waited[0]


def test_redact_hides_secret_fields_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh12345")
    monkeypatch.setenv("DATA_KEY_DIR", "/data/keys")  # a path, not a secret
    config = {
        "logger": {"api_key": "wandb-key-123", "project": "p"},
        "model": {"pad_token": "<|endoftext|>", "path": "/data/keys/model"},
        "run": {"name": "run-hf_abcdefgh12345", "tags": ["hf_abcdefgh12345"]},
        "eval": {"max_new_tokens": 16},
    }
    assert redact(config) == {
        "logger": {"api_key": "***", "project": "p"},
        "model": {"pad_token": "<|endoftext|>", "path": "/data/keys/model"},
        "run": {"name": "run-***", "tags": ["***"]},
        "eval": {"max_new_tokens": 16},
    }


def test_scrub_file_rewrites_only_files_with_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    path = tmp_path / "overrides.yaml"
    path.write_text("- run.name=0123456789abcdef\n")
    scrub_file(path)
    assert path.read_text() == "- run.name=***\n"
