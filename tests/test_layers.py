"""Layering of the package: no import cycle among nextx modules, counting imports inside functions too, and the core
and inference layers never import the training layer (the runtime check, in a fresh interpreter, is
`test_generate.test_inference_imports_nothing_from_training`)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nextx"
TRAINING = {"train", "objective", "data", "engine", "metrics", "demo", "cli", "rundir"}


def _graph() -> dict[str, set[str]]:
    mods = {p.stem for p in PKG.glob("*.py")}
    g = {}
    for m in mods:
        deps = set()
        for n in ast.walk(ast.parse((PKG / f"{m}.py").read_text())):
            if isinstance(n, ast.ImportFrom) and n.module == "nextx":
                deps |= {a.name for a in n.names if a.name in mods}
            elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("nextx."):
                deps.add(n.module.split(".")[1])
            elif isinstance(n, ast.Import):
                deps |= {a.name.split(".")[1] for a in n.names if a.name.startswith("nextx.")}
        g[m] = deps - {m}
    return g


def test_no_import_cycle():
    g = _graph()
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in sorted(g[u]):
            assert state.get(v) != 1, f"import cycle: {' -> '.join(path + [v])}"
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_core_and_inference_do_not_import_training():
    g = _graph()
    for m, deps in g.items():
        if m not in TRAINING:
            assert not deps & TRAINING, f"nextx.{m} imports training module(s) {sorted(deps & TRAINING)}"


def test_cycle_check_can_fail(monkeypatch):
    """The checker itself: a planted cycle is found."""
    import sys

    import pytest

    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    with pytest.raises(AssertionError, match="import cycle: a -> b -> c -> a"):
        test_no_import_cycle()
