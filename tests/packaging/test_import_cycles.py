"""No import cycles in the product: a static graph of every module-to-module import in the
product folders — function-level imports and ``if TYPE_CHECKING:`` blocks included (a cycle
hidden behind either is still two modules that cannot be understood apart) — searched for
cycles. A cycle fails with the chain of modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: repository folder -> its import name (edgeship/<name> are symlinks to these folders)
FOLDERS = {"agent": "edgeship.agent", "converter": "edgeship.converter",
           "fleet": "edgeship.fleet", "devices": "edgeship.devices", "edgeship": "edgeship"}


def product_modules() -> dict[str, Path]:
    modules = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(p.is_symlink() for p in path.relative_to(ROOT).parents if p != Path(".")):
                continue  # edgeship/agent -> ../agent: counted under its real folder
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([name, *parts])] = path
    return modules


def _imported(tree: ast.AST, modules: dict[str, Path], package: str) -> set[str]:
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from pkg import module
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = _imported(ast.parse(path.read_text(), str(path)), modules,
                                package) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a chain ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_product_and_its_imports():
    graph = import_graph()
    assert "edgeship.agent.update.driver" in graph and "edgeship.common.mqtt" in graph
    assert "edgeship.agent.update.table" in graph["edgeship.agent.update.driver"]
    assert "edgeship.agent.protocol" in graph["edgeship.agent.daemon"]


def test_the_product_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
