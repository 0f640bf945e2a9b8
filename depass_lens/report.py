"""A self-contained HTML report: a title, some text, and plotly figures (plotly.js inlined once)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio


@dataclass
class Report:
    """Sections of text and figures, written as one offline HTML file."""

    title: str
    sections: list[tuple[str, str, go.Figure | None]] = field(default_factory=list)

    def add(self, heading: str, text: str = "", figure: go.Figure | None = None) -> None:
        self.sections.append((heading, text, figure))

    def to_html(self) -> str:
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
            "padding:0 1em;color:#222}"
            "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;white-space:pre-wrap}"
            "h2{border-bottom:1px solid #ddd;padding-bottom:.2em}</style>",
            "</head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        first = True
        for heading, text, figure in self.sections:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            if text:
                parts.append(f"<pre>{html.escape(text)}</pre>")
            if figure is not None:
                parts.append(
                    pio.to_html(figure, full_html=False, include_plotlyjs=True if first else False)
                )
                first = False
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path
