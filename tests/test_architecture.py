"""The layout rules of issue 12, checked by walking the source (no import of poolguard needed).

* No import circle among ``src/poolguard`` modules.  Every ``import`` counts:
  module level, inside functions, and under ``if TYPE_CHECKING:``.  A
  TYPE_CHECKING-only edge is still a dependency a reader has to follow, and
  counting it keeps the layers honest (a narrow ``Protocol`` in a lower module
  breaks such an edge instead).
* ``Guard``'s class body stays under 300 lines: it is the documented front and
  the wiring, its jobs live in ``_private`` modules.
* Every module opens with a docstring whose first line says its one job.
* SQLAlchemy private names are reached in ``_compat.py`` only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "poolguard"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The poolguard modules ``name`` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            # `from . import x` names a module x when one exists, else an attribute of stem
            targets = [
                f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names
            ]
        else:
            continue
        for dotted in targets:
            target = dotted
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or self loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_imports_inside_functions_and_type_checking() -> None:
    graph = _graph()
    # module level; inside a function only; under TYPE_CHECKING only
    assert "poolguard._guard" in graph["poolguard._engine"]
    assert "poolguard.errors" in graph["poolguard._pool"]
    assert "poolguard._recorder" in graph["poolguard._stats"]
    # the cycle finder finds a planted circle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    """Each import edge is one way: the package, like psycopg_pool, is layered."""
    cycles = _cycles(_graph())
    assert cycles == [], f"import circles among poolguard modules: {cycles}"


def _class_lines(path: Path, name: str) -> int:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            assert node.end_lineno is not None
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"class {name} not found in {path}")


def test_guard_is_a_thin_front() -> None:
    assert _class_lines(PACKAGE / "_guard.py", "Guard") < 300


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_says_its_one_job(name: str) -> None:
    path = _modules()[name]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.relative_to(SRC)} has no opening docstring"
    summary = doc.strip().split("\n\n")[0]
    first = summary.splitlines()[0]
    # a sentence about the module, starting on the first line: not a title or a bare name
    assert len(first.split()) >= 4, f"{path.relative_to(SRC)}: first docstring line {first!r}"
    assert summary.rstrip().endswith((".", ":")), f"{path.relative_to(SRC)}: {summary!r}"


# SQLAlchemy private names poolguard reaches (attributes, imports, getattr strings).
SQLALCHEMY_PRIVATE = frozenset({
    "_max_overflow", "_invoke_creator", "_connection_record", "_is_asyncio", "_dialect",
    "_pre_ping", "_orig_logging_name", "_dbapi_connection", "_do_return_conn", "_do_get",
    "_all_conns", "_ConnectionRecord", "_ConnectionRecord__pool", "_finalize_fairy",
    "_strong_ref_connection_records", "_pool", "_overflow", "_use_lifo",
    "_creator", "_reset_on_return", "_fairy", "_checkin", "_checkout", "_inc_overflow",
    "_dec_overflow", "_create_connection", "_registry", "_return_conn", "_ConnectionFairy",
})
#: poolguard's own attributes that share a name with a SQLAlchemy one (Guard._pool).
OWN = re.compile(r"\bself\._pool\b")
MARK = "# sqla-private"


def _private_uses(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        hits = [n for n in names if n in SQLALCHEMY_PRIVATE]
        if not hits:
            continue
        line = lines[node.lineno - 1]
        if MARK in line or (hits == ["_pool"] and OWN.search(line)):
            continue
        found.append(f"{path.relative_to(SRC)}:{node.lineno}: {line.strip()}")
    return found


def test_sqlalchemy_private_names_in_compat_only() -> None:
    """One module, _compat.py, knows SQLAlchemy's internals; the hot path's inlined
    reads carry the ``# sqla-private`` mark instead (a call there costs a frame)."""
    offenders = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_compat.py"
        for hit in _private_uses(path)
    ]
    assert offenders == [], "\n".join(offenders)


def test_the_private_name_check_sees_a_use() -> None:
    assert _private_uses(PACKAGE / "_compat.py"), "the checker finds nothing even in _compat.py"
