"""The evaluation report: per method, wall time, protocol curves (with areas), agreement.

Serialises to a dict / JSON, a Markdown table, and a self-contained offline HTML page.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from depass_lens.evaluation.curves import Curve
from depass_lens.evaluation.html import write_page

#: Curve keys shown in the summary table and the HTML figures, per level.
PRIMARY = {
    "tokens": ("prob", "accuracy"),
    "components": ("metric_fraction", "accuracy"),
    "subspace": ("relative_change",),
}


@dataclass
class MethodResult:
    """One method's scores (as run), wall time, protocol curves and agreement numbers."""

    seconds: float | None = None
    curves: dict[str, Curve] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "skipped": self.skipped,
            "agreement": self.agreement,
            "curves": {name: c.to_dict() for name, c in self.curves.items()},
        }


def _clean(value: Any) -> Any:
    """JSON-safe (NaN becomes null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@dataclass
class EvalReport:
    """Per method: wall time, curves (with areas), agreement with the ground truth."""

    level: str
    model: str
    methods: dict[str, MethodResult] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def curves(self) -> dict[str, dict[str, Curve]]:
        """``{method: {curve name: Curve}}`` for the methods that ran."""
        return {n: r.curves for n, r in self.methods.items() if r.skipped is None}

    def _primary(self) -> tuple[str, ...]:
        return PRIMARY.get(self.level, PRIMARY["components"])

    def table(self) -> list[dict[str, Any]]:
        """One row per method: seconds, the areas of the primary keys, agreement numbers."""
        rows = []
        for name, result in self.methods.items():
            row: dict[str, Any] = {"method": name}
            if result.skipped is not None:
                rows.append({**row, "skipped": result.skipped})
                continue
            row["seconds"] = round(result.seconds or 0.0, 3)
            for curve_name, curve in result.curves.items():
                for key in self._primary():
                    if key in curve.values:
                        row[f"{curve_name} AUC({key})"] = round(curve.area(key), 4)
            row.update({k: round(v, 4) for k, v in result.agreement.items()})
            rows.append(row)
        return rows

    def markdown(self) -> str:
        """The summary table in Markdown."""
        rows = self.table()
        if not rows:
            return ""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "level": self.level,
                "model": self.model,
                "notes": self.notes,
                "methods": {name: r.to_dict() for name, r in self.methods.items()},
            }
        )

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        return path

    def figures(self) -> list[tuple[str, go.Figure]]:
        """One figure per curve name and primary key, one trace per method."""
        names = list(dict.fromkeys(c for per in self.curves.values() for c in per))
        figures = []
        for curve_name in names:
            for key in self._primary():
                fig = go.Figure()
                for method, per in self.curves.items():
                    curve = per.get(curve_name)
                    if curve is not None and key in curve.values:
                        fig.add_trace(
                            go.Scatter(
                                x=curve.grid, y=curve.values[key], mode="lines+markers", name=method
                            )
                        )
                if fig.data:
                    fig.update_layout(
                        xaxis_title="fraction masked",
                        yaxis_title=key,
                        template="plotly_white",
                        height=420,
                    )
                    figures.append((f"{curve_name}: {key}", fig))
        return figures

    def to_html(self, path: str | Path) -> Path:
        """A self-contained (offline) HTML report: summary table, settings, curves."""
        return write_page(
            path,
            f"Faithfulness evaluation: {self.model}, {self.level}",
            tables=[("Summary (AUC: area under the curve over the masked fraction)", self.table())],
            notes=self.notes,
            figures=self.figures(),
        )
