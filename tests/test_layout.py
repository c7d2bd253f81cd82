"""The layout rule (README, "Architecture"): a file imports only its own folder and the
folders below it, and the graph of imports between files has no cycle. Every import
counts, also one inside a function or under ``if TYPE_CHECKING``: an import deferred to
dodge a circle is still a circle.

``python tests/test_layout.py`` prints the floors, how many files and imports each has,
and every violation.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("overlay", "bench", "control", "encap", "tun")

# Floors, bottom up. A folder may import its own files and any folder on a lower floor;
# never one on its own floor or above. The top-level files of overlay/ are the programs.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("control", "encap", "tun"),
    ("overlay/kernel", "overlay/observe", "overlay/impair"),
    ("overlay/dataplane",),
    ("overlay/backends",),
    ("overlay/node", "overlay/lab"),
    ("overlay/cli",),
    ("bench",),
    ("overlay",),
)
# Programs that must stay smaller than their floor allows: the CNI plugin runs on every
# pod start and needs the models, not the daemon.
ONLY = {"overlay/cni.py": ("control",)}


@dataclass(frozen=True)
class Violation:
    source: str  # the importing file, relative to the root
    line: int
    target: str  # the imported file
    why: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}: {self.why}"


def folder_of(path: str) -> str:
    """A file's folder as the floors name it (overlay/cli/run.py -> overlay/cli)."""
    parts = Path(path).parts
    if parts[0] == "overlay" and len(parts) > 2:
        return f"overlay/{parts[1]}"
    return parts[0]


def floor_of(folder: str) -> int:
    for number, folders in enumerate(FLOORS):
        if folder in folders:
            return number
    raise KeyError(f"{folder} is on no floor: add it to FLOORS (and to the README)")


def _module_files(root: Path) -> dict[str, str]:
    """Dotted module name -> file (relative path) for every module of our packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            dotted = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            modules[dotted] = rel
    return modules


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str, str]]:
    """(line, name, fallback) of every import in the file, wherever it stands: ``from a
    import b`` imports module ``a.b`` if there is one, else the name b of module ``a``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}", base


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """File -> {imported file: line of its first import}, between our files only."""
    modules = _module_files(root)
    graph: dict[str, dict[str, int]] = {}
    for module, rel in modules.items():
        tree = ast.parse((root / rel).read_text(), rel)
        edges: dict[str, int] = {}
        for line, name, fallback in _imported(tree, module, rel.endswith("__init__.py")):
            target = name if name in modules else fallback
            while target and target not in modules:  # a name inside one of our modules
                target = target.rpartition(".")[0]
            if target and modules[target] != rel:
                edges.setdefault(modules[target], line)
        graph[rel] = edges
    return graph


def floor_violations(graph: dict[str, dict[str, int]]) -> list[Violation]:
    found = []
    for source, edges in sorted(graph.items()):
        mine = folder_of(source)
        for target, line in sorted(edges.items()):
            theirs = folder_of(target)
            if source in ONLY:
                if theirs not in ONLY[source]:
                    found.append(
                        Violation(source, line, target, f"it may import {ONLY[source]} only")
                    )
                continue
            if theirs == mine:
                continue
            if floor_of(theirs) == floor_of(mine):
                found.append(Violation(source, line, target, f"{theirs} is beside {mine}"))
            elif floor_of(theirs) > floor_of(mine):
                found.append(Violation(source, line, target, f"{theirs} is above {mine}"))
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the tests ----------------------------------------------------------------------------


def test_every_file_stands_on_a_floor() -> None:
    for source in import_graph():
        if source not in ONLY:
            floor_of(folder_of(source))  # KeyError names a folder nobody placed


def test_no_file_imports_a_folder_beside_or_above_its_own() -> None:
    violations = floor_violations(import_graph())
    assert not violations, "\n".join(map(str, violations))


def test_the_import_graph_has_no_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def _write(root: Path, files: Iterable[tuple[str, str]]) -> None:
    for rel, text in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_sees_an_upward_and_a_deferred_circular_import(tmp_path: Path) -> None:
    """The checker itself: a tree that breaks both rules, the circle held open by an
    import deferred into a function, is caught on both counts."""
    _write(
        tmp_path,
        [
            *((f"{p}/__init__.py", "") for p in PACKAGES),
            ("overlay/observe/__init__.py", ""),
            ("overlay/node/__init__.py", ""),
            ("control/models.py", "from overlay.node import daemon\n"),
            ("overlay/node/daemon.py", "def run():\n    from overlay.observe import log\n"),
            ("overlay/observe/log.py", "def f():\n    from overlay.node.daemon import run\n"),
            ("overlay/observe/metrics.py", "from .log import f\n"),
        ],
    )
    graph = import_graph(tmp_path)
    assert graph["overlay/observe/metrics.py"] == {"overlay/observe/log.py": 1}
    violations = {(v.source, v.target) for v in floor_violations(graph)}
    assert violations == {
        ("control/models.py", "overlay/node/daemon.py"),
        ("overlay/observe/log.py", "overlay/node/daemon.py"),
    }
    assert cycles(graph) == [["overlay/node/daemon.py", "overlay/observe/log.py"]]


def report() -> str:
    graph = import_graph()
    lines = []
    for number in reversed(range(len(FLOORS))):
        for folder in FLOORS[number]:
            files = [f for f in graph if folder_of(f) == folder]
            imports = sum(len(graph[f]) for f in files)
            name = folder + "/"
            lines.append(f"floor {number}  {name:<20} {len(files):>3} files {imports:>4} imports")
    violations = floor_violations(graph)
    circles = cycles(graph)
    lines += [str(v) for v in violations]
    lines += [" <-> ".join(c) for c in circles]
    edges = sum(len(e) for e in graph.values())
    lines.append(
        f"{len(graph)} files, {edges} imports between them: {len(violations)} against the "
        f"floors, {len(circles)} cycles"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
