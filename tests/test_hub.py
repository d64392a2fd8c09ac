"""The hub is asked once: one connection attempt, and when it fails every library this process
and its workers import reads its local cache instead of retrying."""

from __future__ import annotations

import os
import socket

import pytest

from posttrain import hub


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hub.reachable.cache_clear()
    yield
    hub.reachable.cache_clear()


def test_an_unreachable_hub_is_asked_once_and_the_libraries_go_offline(fresh, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    attempts = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a) or real(*a, **k))
    assert hub.reachable() == (False, "127.0.0.1 cannot be reached: Connection refused")
    assert hub.reachable()[0] is False and len(attempts) == 1
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_hub_that_answers_is_reachable(fresh, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.reachable() == (True, "")
    assert "HF_HUB_OFFLINE" not in os.environ


def test_hf_hub_offline_counts_as_unreachable_without_a_connection(fresh, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    assert hub.reachable() == (False, "HF_HUB_OFFLINE=1")


@pytest.mark.parametrize(
    "path, is_hub",
    [("Qwen/Qwen2.5-0.5B", True), ("gpt2", True), ("builtin:tiny", False), ("/models/x", False), ("a/b/c", False)],
)
def test_what_names_a_hub_repository(path, is_hub):
    assert hub.is_hub_id(path) is is_hub
