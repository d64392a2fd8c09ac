"""Advisory file locks that a crashed holder cannot leave behind.

`fcntl.flock` is released by the kernel when its process dies (kill -9 included), so a
lock file left on disk never blocks a later run. The file records who holds it, for the
message the next process prints.

    with FileLock(run_dir / ".posttrain.lock", "run folder"):   # raises LockedError if held
        ...
    with FileLock(path, "stage sft", wait=True):                 # waits for the holder
        ...
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from posttrain.errors import PosttrainError


class LockedError(PosttrainError):
    """Another live process holds the lock."""


class FileLock:
    def __init__(self, path: Path, what: str, wait: bool = False, on_wait=None, hint: str = ""):
        """`hint`: what to do instead, appended to the LockedError's message."""
        self.path, self.what, self.wait, self.on_wait, self.hint = path, what, wait, on_wait, hint
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            return f"pid {info['pid']} on {info['host']} (since {since})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.wait:
                os.close(fd)
                hint = f"; {self.hint}" if self.hint else ""
                raise LockedError(f"{self.what} {self.path.parent} is in use by {self.holder()}{hint}") from None
            if self.on_wait is not None:
                self.on_wait(self.holder())
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
