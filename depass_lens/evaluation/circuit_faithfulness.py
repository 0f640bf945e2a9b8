"""Faithfulness of circuits against edge budgets: every method's curve on one patching harness.

For an edge budget ``k``, a method's circuit is its ``k`` highest-|score| patchable edges; its
faithfulness is ``(m(circuit) - m(corrupt)) / (m(clean) - m(corrupt))`` under edge patching
(:class:`~depass_lens.circuits.patching.EdgePatcher`). Budgets form a geometric grid from one
edge to all of them (small circuits are what circuit discovery is for); the area is taken over
the kept fraction ``k / n`` in [0, 1], with 0 at no edges and 1 at all edges by definition.
ACDC gives one circuit per threshold, so its curve has one point per threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm import tqdm

from depass_lens.circuits.extract import patchable, select_edges
from depass_lens.circuits.graph import Graph
from depass_lens.circuits.patching import EdgePatcher
from depass_lens.evaluation.circuit_baselines import AcdcResult
from depass_lens.evaluation.curves import trapezoid_area


def budget_grid(n_edges: int, points: int = 24) -> list[int]:
    """Distinct edge counts on a geometric grid from 1 to ``n_edges``."""
    grid = np.unique(np.round(np.geomspace(1, n_edges, points)).astype(int))
    return [int(k) for k in grid]


@dataclass
class CircuitCurve:
    """One method's faithfulness against the number of edges kept."""

    method: str
    n_edges: int  # patchable edges in the graph
    budgets: list[int]
    faithfulness: list[float]
    kept: list[int] = field(default_factory=list)  # edges left after pruning, per budget
    seconds: float = 0.0  # time to score the edges (or to run ACDC)

    @property
    def area(self) -> float:
        """Area under faithfulness over the kept fraction, from (0, 0) to (1, 1)."""
        x = [0.0] + [k / self.n_edges for k in self.budgets] + [1.0]
        y = [0.0, *self.faithfulness, 1.0]
        order = np.argsort(x, kind="stable")
        return trapezoid_area([x[i] for i in order], [y[i] for i in order])

    def at(self, budget: int) -> float:
        """Faithfulness at ``budget`` (linear interpolation between measured budgets)."""
        x = [0, *self.budgets, self.n_edges]
        return float(np.interp(budget, x, [0.0, *self.faithfulness, 1.0]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "area": self.area}


def graph_curve(
    patcher: EdgePatcher,
    graph: Graph,
    budgets: Sequence[int],
    seconds: float = 0.0,
    name: str | None = None,
    progress: bool = False,
) -> CircuitCurve:
    """Faithfulness of ``graph``'s top-k circuits at each budget (one patched forward each)."""
    n = int(patchable(graph.spec).sum())
    values, kept = [], []
    for k in tqdm(budgets, desc=name or graph.method, leave=False, delay=2.0, disable=not progress):
        keep = select_edges(graph, k=k, prune=False)
        values.append(patcher.faithfulness(keep))
        kept.append(int(select_edges(graph, k=k, prune=True).sum()))
    return CircuitCurve(name or graph.method, n, list(budgets), values, kept, seconds)


def acdc_curve(patcher: EdgePatcher, result: AcdcResult) -> CircuitCurve:
    """ACDC's circuits (one per threshold) as points of a curve, sorted by size."""
    n = int(patchable(patcher.spec).sum())
    points = sorted((int(c.sum()), patcher.faithfulness(c)) for c in result.circuits)
    return CircuitCurve(
        "acdc",
        n,
        [k for k, _ in points],
        [f for _, f in points],
        [k for k, _ in points],
        result.seconds,
    )


def timed(fn: Callable[[], Graph]) -> tuple[Graph, float]:
    start = time.perf_counter()
    graph = fn()
    return graph, time.perf_counter() - start


def wins(
    curves: Mapping[str, CircuitCurve], ours: str, theirs: str, tolerance: float = 1e-3
) -> dict[str, Any]:
    """Budgets (of ``ours``'s grid) where ``ours`` is at least as faithful as ``theirs``."""
    a, b = curves[ours], curves[theirs]
    at_least = [k for k in a.budgets if a.at(k) >= b.at(k) - tolerance]
    gaps = [b.at(k) - a.at(k) for k in a.budgets]
    return {
        "ours": ours,
        "theirs": theirs,
        "budgets": len(a.budgets),
        "at_least_as_faithful": len(at_least),
        "share": len(at_least) / len(a.budgets),
        "worst_gap": max(gaps),
        "worst_gap_budget": a.budgets[int(np.argmax(gaps))],
    }


def figure(
    curves_by_model: Mapping[str, Mapping[str, CircuitCurve]], title: str = "Circuit faithfulness"
) -> go.Figure:
    """Faithfulness against edges kept: one panel per model, every method in each panel."""
    names = list(curves_by_model)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06)
    palette = {
        "depass-symmetric": "#d62728",
        "depass-contrast": "#ff7f0e",
        "depass-value": "#8c564b",
        "depass-contrast-clean": "#e377c2",
        "eap": "#1f77b4",
        "eap-ig": "#2ca02c",
        "acdc": "#7f7f7f",
    }
    for col, model in enumerate(names, start=1):
        for method, curve in curves_by_model[model].items():
            fig.add_trace(
                go.Scatter(
                    x=curve.budgets,
                    y=curve.faithfulness,
                    mode="lines+markers" if method != "acdc" else "markers",
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    line={"color": palette.get(method)},
                    marker={"size": 5 if method != "acdc" else 9},
                    hovertemplate=(
                        f"{method}<br>%{{x}} edges<br>faithfulness %{{y:.3f}}"
                        f"<br>area {curve.area:.3f}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(type="log", title_text="edges kept", row=1, col=col)
    fig.update_yaxes(title_text="normalised faithfulness", row=1, col=1)
    fig.update_layout(
        title=title, height=420, width=max(520, 360 * len(names)), template="plotly_white"
    )
    return fig


__all__ = [
    "CircuitCurve",
    "acdc_curve",
    "budget_grid",
    "figure",
    "graph_curve",
    "timed",
    "wins",
]
