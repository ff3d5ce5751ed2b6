"""The house rules of the source tree (README, Conventions): no import cycle, relative imports inside the package,
no source file over 450 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finereg"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _nodes(body: list[ast.stmt]):
    """Every statement under ``body``, inside functions and classes too, but not in ``if TYPE_CHECKING:`` blocks
    (they never run)."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _nodes([n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.excepthandler))])


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The finereg modules ``module`` imports, at module level or inside a function: a deferred import is still
    a dependency (a cycle hidden inside a function is a cycle in the design)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()
    for node in _nodes(tree.body):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = _resolve(module, is_package, node.level, node.module)
            if node.module:  # from .x import y: the module x (and y, if y is a submodule of x)
                found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    return {m for m in found if m in known and m != module}


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a parent package importing its own submodules is how packages export names; cycles elsewhere are bugs
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_relative_imports_inside_the_package():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "finereg":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "finereg" for a in node.names):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders


def test_no_source_file_over_450_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
