"""The documentation builds with warnings as errors, and its marked snippets run.

A python block preceded by ``<!-- test -->`` in ``docs/`` is executed (in page order, sharing one
namespace per page) against the zoo's ``ioi`` model with ``model`` and ``prompt`` predefined, so
the documented API cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
SNIPPET = re.compile(r"<!-- test -->\s*```python\n(.*?)```", re.DOTALL)
PAGES = sorted(p for p in DOCS.rglob("*.md") if SNIPPET.search(p.read_text()))


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_documented_snippets_run(page, tmp_path, monkeypatch):
    from depass_lens import zoo

    model = zoo.load("ioi")
    prompt = "When Mary and John went to the store , John gave a drink to"
    monkeypatch.chdir(tmp_path)  # snippets may write figures
    namespace = {"model": model, "prompt": prompt}
    for block in SNIPPET.findall(page.read_text()):
        exec(compile(block, f"{page.name}", "exec"), namespace)  # noqa: S102
