"""Build the notebooks from their sources, execute them, and save them with outputs.

    python notebooks/build.py            # every notebook
    python notebooks/build.py 02         # those whose name starts with 02

Sources live in ``notebooks/src/*.py`` in the percent format (``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell whose lines start with ``# ``), so they review and diff as code.
The executed ``.ipynb`` beside this file is what readers open; CI re-executes it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
CELL = re.compile(r"^# %%(?P<md> \[markdown\])?[^\n]*\n", re.MULTILINE)


def parse(source: str) -> nbformat.NotebookNode:
    """Percent-format Python to a notebook (no outputs)."""
    nb = nbformat.v4.new_notebook()
    marks = list(CELL.finditer(source))
    for mark, nxt in zip(marks, marks[1:] + [None], strict=False):
        body = source[mark.end() : nxt.start() if nxt else len(source)].strip("\n")
        if mark.group("md"):
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#")
                for line in body.splitlines()
            )
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        elif body.strip():
            nb.cells.append(nbformat.v4.new_code_cell(body))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    return nb


def build(prefix: str = "") -> list[Path]:
    written = []
    for src in sorted((HERE / "src").glob(f"{prefix}*.py")):
        nb = execute(parse(src.read_text()))
        out = HERE / f"{src.stem}.ipynb"
        nbformat.write(nb, out)
        written.append(out)
        print(f"built {out.relative_to(HERE.parent)}")
    return written


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "")
