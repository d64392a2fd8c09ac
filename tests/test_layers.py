"""The package's layers (docs/contributing.md, "Where things are"): posttrain modules import each other at the
top of the file, downward only, with no cycle; heavy third-party libraries are imported inside
functions, so `posttrain --help` and `plan=true` start fast."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "posttrain"
# imported inside functions only (each costs seconds or pulls in CUDA)
HEAVY = ("torch", "transformers", "trl", "datasets", "deepspeed", "vllm", "matplotlib", "peft", "accelerate")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, at the module's top level) for every import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(node, n if n in MODULES else node.module, id(node) in top) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node, a.name, id(node) in top) for a in node.names]
    return found


def graph() -> dict[str, set[str]]:
    return {
        name: {target for _, target, _ in imports(path) if target in MODULES and target != name}
        for name, path in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_posttrain_modules():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_posttrain_modules_are_imported_at_the_top_of_the_file():
    inside = [
        f"{module_name(path)}:{node.lineno} {target}"
        for path in MODULES.values()
        for node, target, at_top in imports(path)
        if target.startswith("posttrain") and not at_top
    ]
    assert inside == []


def test_heavy_libraries_are_imported_inside_functions_only():
    at_top = [
        f"{module_name(path)}:{node.lineno} {target}"
        for path in MODULES.values()
        for node, target, top in imports(path)
        if top and target.split(".")[0] in HEAVY
    ]
    assert at_top == []
