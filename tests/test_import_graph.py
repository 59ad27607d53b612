"""The ingestd package has no import cycle.

The graph is read from the source with `ast`, so it sees every import a
module can run: at the top, and inside functions (the usual way a cycle is
hidden rather than broken). Imports under `if TYPE_CHECKING:` are left out:
they never run, and with `from __future__ import annotations` the names they
bring only appear in annotations, which are never evaluated at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ingestd"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, but those under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    package = name.split(".")
                    if not is_package:
                        package.pop()
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, *([base] if base else [])])
                # `from a import b`: the module a.b if there is one, else a.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def unresolved_imports(root: Path = PACKAGE) -> list[str]:
    """Imports of the package that name no module of this tree. (An editable
    install of another checkout would otherwise serve them from there.)"""
    modules = module_names(root)
    missing = []
    for name, path in modules.items():
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif node.level == 0 and node.module is not None:
                if node.module in modules and modules[node.module].name == "__init__.py":
                    source = modules[node.module].read_text()
                    wanted = [
                        f"{node.module}.{alias.name}"
                        for alias in node.names
                        if f"{node.module}.{alias.name}" in modules or alias.name not in source
                    ]
                else:
                    wanted = [node.module]
            else:
                continue
            missing += [
                f"{name}: {target}"
                for target in wanted
                if target.split(".")[0] == root.name and target not in modules
            ]
    return missing


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles (closed paths of modules): in each strongly connected component,
    the shortest through each of its modules, so every module caught in one
    is named."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles: list[list[str]] = []
    for component in components:
        for start in sorted(component):
            cycle = _cycle_through(graph, component, start)
            if not any(set(cycle) == set(seen) for seen in cycles):
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest path from `start` back to itself, inside its component."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first: the shortest way round
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_of_the_package_names_one_of_its_modules():
    assert unresolved_imports() == []


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    assert find_cycles(import_graph(package)) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_serving_imports_no_tool():
    """`ingestd serve` does not load nats-py (JetStream only when routed
    there) nor the export and simulate tools."""
    code = (
        "import sys, ingestd.cli; "
        "print(sorted(m for m in sys.modules "
        "if m in ('nats', 'ingestd.tools.export', 'ingestd.tools.simulate')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    ).stdout
    assert out.strip() == "[]"
