"""The package's shape: dependencies point one way, and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import caiosfs

PKG = Path(caiosfs.__file__).parent

# Edges allowed to close a cycle for a while (a module being rewritten elsewhere); each must
# still exist, so the allowance cannot outlive the fix. None today.
PENDING: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that runs: the bodies of ``if TYPE_CHECKING:`` never do."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside a function."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in mods else base)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports() -> None:
    g = import_graph()
    assert "caiosfs.fs" in g["caiosfs.compose"]  # imported inside build_filesystem only
    assert "caiosfs.compose" in g["caiosfs.mount"]
    assert "caiosfs.config" not in g["caiosfs.errors"]  # under TYPE_CHECKING only


def test_no_import_cycle() -> None:
    graph = import_graph()
    for a, b in PENDING:
        assert b in graph[a], f"{a} no longer imports {b}: drop it from PENDING"
        graph[a].discard(b)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_part_imports_the_composition_root() -> None:
    users = {m for m, deps in import_graph().items() if "caiosfs.compose" in deps}
    assert users <= {"caiosfs.mount", "caiosfs.warm", "caiosfs.cli"}, users


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """An import cycle or a missing import shows only when a module is imported first."""
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"],
                                    stderr=subprocess.PIPE, text=True)
             for name in _modules()}
    failed = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        if p.returncode != 0:
            failed[name] = err.strip().splitlines()[-1:]
    assert not failed, failed


def test_the_socket_clients_do_not_import_the_daemon() -> None:
    """`caiosfs umount`, `status` and `flush` (run by fstab, the CSI plugin and every test)
    only talk to the control socket: the filesystem, boto3 and trio cost them ~0.1-0.2 s of
    CPU per call."""
    code = "import sys, caiosfs.umount, caiosfs.cli; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    heavy = {"boto3", "botocore", "pyfuse3", "trio", "caiosfs.mount", "caiosfs.core"}
    assert not heavy & set(out), heavy & set(out)
