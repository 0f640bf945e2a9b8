"""A self-contained HTML page (plotly.js inlined once, so it opens offline): tables and figures."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;font-size:.85em;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}"
    "td:first-child{text-align:left}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}"
    "h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def table_html(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as an HTML table (columns in first-seen order)."""
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_page(
    path: str | Path,
    title: str,
    *,
    tables: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (),
    notes: dict[str, Any] | None = None,
    figures: Sequence[tuple[str, go.Figure]] = (),
) -> Path:
    """Write ``title``, the tables, the notes (as JSON) and the figures to ``path``."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for heading, rows in tables:
        parts += [f"<h2>{html.escape(heading)}</h2>", table_html(rows)]
    if notes:
        text = json.dumps(notes, indent=1, default=str)
        parts += ["<h2>Settings</h2>", f"<pre>{html.escape(text)}</pre>"]
    for heading, figure in figures:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(figure.to_html(full_html=False, include_plotlyjs=False))
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
