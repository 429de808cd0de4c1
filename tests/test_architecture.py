"""The house rules the layout promises (docs/design.md): data flows one way through the floors,
no import circle, and functions short enough to read."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "efquant_fx"

# the floors, bottom to top; a module may import from its own floor or below, never above
FLOORS: dict[str, int] = {
    "errors": 0, "files": 0, "device": 0, "rundir": 0, "datakinds": 0, "logs": 0,
    "recipe": 1,
    "result": 2, "models": 2,
    "graph": 3, "data": 3,
    "finetune": 4, "eval": 4,
    "export": 5,
    "api": 6, "reload": 6,
    "pipeline": 7, "quickstart": 7, "ddp": 7,
    "cli": 8,
    "__init__": 9, "__main__": 9,  # the package's public face
}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports() -> dict[str, set[str]]:
    """Every efquant_fx import of every module, lazy (function-level) imports included."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("efquant_fx"):
                edges[module].add(node.module)
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name.startswith("efquant_fx"))
    return edges


def test_every_room_has_a_floor():
    rooms = {_room(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(FLOORS), f"new top-level modules need a floor in this test: {sorted(rooms - set(FLOORS))}"


def test_no_import_from_a_higher_floor():
    climbs = sorted(f"{a} imports {b}" for a, targets in _imports().items() for b in targets
                    if b != "efquant_fx" and FLOORS.get(_room(b), 0) > FLOORS.get(_room(a), 0))
    assert not climbs, "\n".join(climbs)


def test_no_import_circle():
    edges = {a: {b for b in bs if b not in ("efquant_fx", a)} for a, bs in _imports().items()}
    # a package's __init__ re-exports its modules; that is how packages work, not a circle
    edges = {a: {b for b in bs if not (a.startswith(b + ".") and b in edges)} for a, bs in edges.items()}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in edges.get(node, ()):
            if nxt in on_path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                on_path.add(nxt)
                visit(nxt, path + [nxt], on_path, done)
                on_path.discard(nxt)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_no_function_over_the_limit():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
