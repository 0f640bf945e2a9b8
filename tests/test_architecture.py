"""The package's picture stays simple: no import cycles, and the engine imports no front end.

Read from the source with ``ast``: every import, function-local ones included (a local import
that dodges a cycle at load time is still a cycle in the design), except those under
``if TYPE_CHECKING:``, which exist for annotations only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "depass_lens"

#: The propagation engine: forward and adjoint modes and what they freeze.
ENGINE = [
    "depass_lens.propagate",
    "depass_lens.adjoint",
    "depass_lens.difference",
    "depass_lens.frozen",
    "depass_lens.rules",
    "depass_lens.norms",
    "depass_lens.qk",
    "depass_lens.integrated_softmax",
    "depass_lens.pattern_gradient",
]
#: What the engine must never import: sources, targets, results, plots, evaluation.
FRONT_END = (
    "depass_lens.sources",
    "depass_lens.targets",
    "depass_lens.results",
    "depass_lens.plot",
    "depass_lens.evaluation",
    "depass_lens.report",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(tree: ast.AST):
    """Every import statement in ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for orelse in node.orelse for n in _imports_in(orelse))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (``if TYPE_CHECKING`` aside)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                # ``from pkg import submodule`` depends on the submodule, not on all of ``pkg``
                found = [s for s in subs if s in modules] or [node.module]
            else:
                continue
            graph[name] |= {f for f in found if f in modules and f != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycles():
    graph = _import_graph()
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("module", ENGINE)
def test_engine_imports_no_front_end(module):
    graph = _import_graph()
    assert module in graph, f"{module} moved: update ENGINE"
    bad = sorted(m for m in _reachable(graph, module) if m.startswith(FRONT_END))
    assert not bad, f"{module} reaches {bad}"
