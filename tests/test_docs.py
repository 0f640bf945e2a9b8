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


def test_docs_math_renders_offline(tmp_path):
    """MathJax is served from the built site, never from a CDN: formulas render offline.

    The vendored single-file component lands in the site, every page loads it (after its
    config script) by a relative path, and nothing (page or mkdocs.yml) loads a script or a
    stylesheet from an external http(s) URL.
    """
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    import yaml

    vendored = "javascripts/mathjax/tex-svg-full.js"
    config_js = "javascripts/mathjax-config.js"
    external = re.compile(r"^(https?:)?//", re.IGNORECASE)

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    scripts = [s if isinstance(s, str) else s["path"] for s in config.get("extra_javascript", [])]
    styles = [s if isinstance(s, str) else s["path"] for s in config.get("extra_css", [])]
    assert not [s for s in scripts + styles if external.match(s)], "external asset in mkdocs.yml"
    assert scripts.index(config_js) < scripts.index(vendored), "MathJax config must load first"
    assert not re.search(r"https?://\S+\.js\b", (ROOT / "mkdocs.yml").read_text())

    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    built = site / vendored
    assert built.is_file()
    assert built.read_bytes() == (DOCS / vendored).read_bytes()
    assert built.stat().st_size > 1_000_000  # the real bundle, not a stub or an LFS pointer
    assert (site / "javascripts/mathjax/LICENSE").is_file()
    assert (site / "javascripts/mathjax/NOTICE").is_file()

    script_src = re.compile(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", re.IGNORECASE)
    stylesheet = re.compile(
        r"<link\b(?=[^>]*\brel=\"stylesheet\")[^>]*\bhref=\"([^\"]+)\"", re.IGNORECASE
    )
    pages = sorted(site.rglob("*.html"))
    assert any("arithmatex" in p.read_text() for p in pages), "no page has a formula"
    for page in pages:
        html = page.read_text()
        name = str(page.relative_to(site))
        srcs = script_src.findall(html)
        assert not [u for u in srcs + stylesheet.findall(html) if external.match(u)], name
        mathjax = [s for s in srcs if s.endswith("mathjax/tex-svg-full.js")]
        assert len(mathjax) == 1, f"{name} does not load the vendored MathJax"
        configs = [s for s in srcs if s.endswith("mathjax-config.js")]
        assert configs and srcs.index(configs[0]) < srcs.index(mathjax[0]), name
        if name == "404.html":  # served at any URL, so mkdocs roots its links at the site
            continue
        assert not mathjax[0].startswith("/"), f"{name}: {mathjax[0]} is not relative"
        assert (page.parent / mathjax[0]).resolve() == built.resolve(), name
