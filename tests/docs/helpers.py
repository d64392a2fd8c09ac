"""The docs' own code, for the tests: the reference generator (docs/hooks/reference.py, an MkDocs
hook, not a package module) and the commands the pages mark as runnable."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from functools import cache
from types import ModuleType

from tests.conftest import REPO

DOCS = REPO / "docs"
# a fenced block whose info string carries the class `runnable`: ```bash { .runnable }
RUNNABLE = re.compile(r"^```[^\n]*\{[^}\n]*\.runnable\b[^}\n]*\}[^\n]*\n(.*?)^```", re.M | re.S)


@cache
def reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def runnable_commands() -> list[tuple[str, str]]:
    """(page, command line) of every `posttrain` command in a runnable block, continuation lines
    joined and comments dropped."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for block in RUNNABLE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    found.append((page.name, shlex.join(words)))
    return found
