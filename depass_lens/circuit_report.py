"""The report behind ``depass-lens graph``: a model's circuit for a task, found and checked.

For a zoo model the task's held-out prompts, their corrupted counterparts and the logit
difference answer - wrong are used; for any other model a prompt, a target and optionally a
corrupted prompt. The report shows the circuit (its strongest edges, pruned to input-to-target
paths), the edge and node tables, the conservation checks and, when there is a corrupted input,
the circuit's faithfulness under edge patching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

import depass_lens as dp
from depass_lens import plot
from depass_lens.adapters.base import TLModel
from depass_lens.circuits import Circuit, Graph
from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric
from depass_lens.report import Report
from depass_lens.targets import Target


@dataclass
class GraphResult:
    """What ``depass-lens graph`` computed (for the printed summary and tests)."""

    path: Path
    graph: Graph
    circuit: Circuit
    faithfulness: float | None
    seconds: float

    def summary(self) -> str:
        conservation = ", ".join(f"{k} {v:.1e}" for k, v in self.graph.conservation().items())
        lines = [
            f"graph: {self.graph!r}",
            f"conservation (largest relative violation): {conservation}",
            f"circuit: {self.circuit.n_edges} edges, {len(self.circuit.node_names)} nodes",
            "strongest edges: "
            + "; ".join(f"{name} {value:+.3f}" for name, value in self.graph.top(5)),
        ]
        if self.faithfulness is not None:
            lines.append(f"faithfulness of the circuit (edge patching): {self.faithfulness:.3f}")
        lines.append(f"computed in {self.seconds:.1f} s; report: {self.path}")
        return "\n".join(lines)


def _table(rows: list[dict], limit: int) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [" | ".join(keys)]
    for row in rows[:limit]:
        cells = []
        for key in keys:
            value = row[key]
            cells.append(f"{value:+.4f}" if isinstance(value, float) else str(value))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def run_graph(
    model: TLModel,
    tokens: Tensor | str | list[str],
    target: Target,
    out: str | Path = "circuit.html",
    *,
    corrupted: Tensor | str | list[str] | None = None,
    answers: tuple[Tensor, Tensor] | None = None,
    k: int = 30,
    attention: str = "symmetric",
    title: str = "DePass circuit",
) -> GraphResult:
    """Compute the graph, extract its top-``k`` circuit and write the report to ``out``."""
    start = time.perf_counter()
    depass = dp.DePass(model, attention=attention)
    graph = depass.graph(tokens, target, contrast=corrupted)
    n_patchable = sum(graph.spec.nodes[e.sender].kind != "bias" for e in graph.spec.edges)
    circuit = graph.circuit(k=min(k, n_patchable))
    faithfulness = None
    if corrupted is not None and answers is not None:
        prepared = depass.prepare(tokens)
        patcher = EdgePatcher(
            depass.adapter,
            graph.spec,
            prepared.tokens,
            logit_diff_metric(*answers, prepared.attention_mask),
            corrupted=depass.prepare(corrupted).tokens,
            attention_mask=prepared.attention_mask,
        )
        faithfulness = patcher.faithfulness(circuit.keep)
    report = Report(title)
    clean = float(graph.target_values[:, 0].mean())
    text = f"target: {graph.target_names[0]} = {clean:.4f} on the prompts"
    if graph.contrast:
        change = float(graph.node_scores[:, 0, graph.spec.target].mean())
        text += f", {change:+.4f} relative to the corrupted prompts (what the edges split)"
    text += (
        f" (mean over {graph.edge_scores.shape[0]} prompt(s))\n"
        f"graph: {len(graph.spec.nodes)} nodes, {graph.n_edges} edges, {graph.describe()}\n"
        "conservation (largest relative violation): "
        + ", ".join(f"{law} {err:.1e}" for law, err in graph.conservation().items())
    )
    if faithfulness is not None:
        text += (
            f"\ncircuit of {circuit.n_edges} edges: normalised faithfulness {faithfulness:.3f} "
            "under edge patching (1 = the clean run, 0 = the corrupted run)"
        )
    report.add("Summary", text)
    report.add(
        f"Circuit: the {k} strongest edges, pruned to input-to-target paths",
        "Edges coloured by the input they enter (q, k, v, mlp, direct), solid positive, dotted "
        "negative, width by |score|; nodes coloured by their score. Hover for numbers.",
        plot.graph(circuit),
    )
    report.add("Edges of the circuit", _table(circuit.edge_table(), 200))
    nodes = [r for r in graph.node_table() if r["node"] in set(circuit.node_names)]
    report.add("Nodes of the circuit", _table(nodes, 200))
    path = report.write(out)
    (path.with_suffix(".json")).write_text(graph.to_json())
    (path.with_suffix(".dot")).write_text(circuit.to_dot())
    return GraphResult(path, graph, circuit, faithfulness, time.perf_counter() - start)
