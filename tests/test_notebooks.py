"""Every committed notebook matches its source and runs top to bottom, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")


def _builder():
    spec = importlib.util.spec_from_file_location("nb_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCES = sorted((NOTEBOOKS / "src").glob("*.py"))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_is_built_and_runs(source):
    build = _builder()
    committed = NOTEBOOKS / f"{source.stem}.ipynb"
    assert committed.exists(), f"run `python notebooks/build.py {source.stem[:2]}` and commit it"
    saved = nbformat.read(committed, as_version=4)
    fresh = build.parse(source.read_text())
    assert [c.source for c in saved.cells] == [c.source for c in fresh.cells], (
        "the committed notebook is stale: rebuild it from its source"
    )
    assert any(c.get("outputs") for c in saved.cells if c.cell_type == "code"), "saved w/o outputs"
    executed = build.execute(fresh)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0]["evalue"] if errors else ""
