"""The agent (the base install) must run on Python 3.9 (Debian 11, Pi OS bullseye) and 3.10
(JetPack 6). A quick guard on this machine's 3.11: parse the agent's modules with 3.9's
grammar and look for the 3.10+ calls that parse fine but fail when they run.
scripts/py39-check runs the agent's tests on a real Python 3.9."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: what a device install imports: the agent, the board profiles, the top-level CLI
DEVICE_CODE = [*sorted((ROOT / "agent").rglob("*.py")), *sorted((ROOT / "devices").rglob("*.py")),
               *sorted((ROOT / "edgeship" / "common").rglob("*.py")),
               *(ROOT / "edgeship" / n for n in ("__init__.py", "__main__.py", "cli.py",
                                                  "cliutil.py"))]
NEW_MODULES = {"tomllib": "3.11"}
NEW_NAMES = {("enum", "StrEnum"): "3.11", ("typing", "Self"): "3.11",
             ("typing", "TypeAlias"): "3.10", ("typing", "ParamSpec"): "3.10",
             ("datetime", "UTC"): "3.11", ("itertools", "pairwise"): "3.10"}
NEW_KEYWORDS = {"zip": {"strict"}, "dataclass": {"slots", "kw_only", "match_args"}}
TYPE_NAMES = {"int", "float", "str", "bytes", "bool", "None", "dict", "list", "tuple", "set",
              "Path", "type"}


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (strings under `from __future__ import
    annotations`, never evaluated)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        anns = []
        if isinstance(node, (ast.AnnAssign,)):
            anns.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            anns.append(node.returns)
            a = node.args
            anns += [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs,
                                            a.vararg, a.kwarg) if x is not None]
        for ann in anns:
            if ann is not None:
                inside.update(id(n) for n in ast.walk(ann))
    return inside


def _class_like(node: ast.AST) -> bool:
    """A CamelCase name (``Counts = ClassCounts | RegressionCounts``), not a CONSTANT flag."""
    name = getattr(node, "id", None) or getattr(node, "attr", None) or ""
    return name[:1].isupper() and not name.isupper()


def _problems(path: Path) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source, str(path), feature_version=(3, 9))  # match, except*, ...
    in_annotation = _annotation_nodes(tree)
    rel = path.relative_to(ROOT)
    shim = path.name == "compat.py"  # the one place that imports them, behind a version test
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)) and shim:
            continue
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name} (Python {NEW_MODULES[a.name]})"
                      for a in node.names if a.name in NEW_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                      if (node.module, a.name) in NEW_NAMES or node.module in NEW_MODULES]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            bad = NEW_KEYWORDS.get(name, set()) & {k.arg for k in node.keywords}
            found += [f"{where}: {name}({k}=...)" for k in sorted(bad)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and \
                id(node) not in in_annotation and (any(
                    getattr(side, "id", None) in TYPE_NAMES or
                    (isinstance(side, ast.Constant) and side.value is None)
                    for side in (node.left, node.right)) or
                    all(_class_like(side) for side in (node.left, node.right))):
            found.append(f"{where}: X | Y between types outside an annotation (3.10)")
    if "from __future__ import annotations" not in source and source.strip() and \
            any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and
                id(n) in in_annotation for n in ast.walk(tree)):
        found.append(f"{rel}: X | Y annotations without 'from __future__ import annotations'")
    return found


def test_device_code_runs_on_python_3_9():
    problems = [p for path in DEVICE_CODE for p in _problems(path)]
    assert not problems, "\n".join(problems)


def test_the_guard_finds_what_python_3_9_rejects(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import tomllib\nfrom enum import StrEnum\nx = zip([1], [2], strict=True)\n"
                   "Opt = int | None\ndef f(a: int | None) -> None: ...\n"
                   "Either = ClassA | ClassB\nflags = re.IGNORECASE | re.DOTALL\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _problems(bad)
    finally:
        ROOT = saved
    assert len(found) == 6, found  # 5 calls/imports/aliases + annotations without __future__
