"""A circuit: the subset of a graph's edges that is kept, with its tables and exports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Bool
from torch import Tensor

if TYPE_CHECKING:
    from depass_lens.circuits.graph import Graph


@dataclass
class Circuit:
    """A subset of a graph's edges (``keep``) and the nodes they touch."""

    graph: Graph
    keep: Bool[Tensor, " edge"]
    target: int = 0

    def __repr__(self) -> str:
        return f"Circuit({self.n_edges} edges, {len(self.node_names)} nodes, {self.graph.method})"

    @property
    def n_edges(self) -> int:
        return int(self.keep.sum())

    @property
    def edge_indices(self) -> list[int]:
        return [int(i) for i in self.keep.nonzero().flatten()]

    @property
    def node_names(self) -> list[str]:
        names = set()
        for i in self.edge_indices:
            e = self.graph.spec.edges[i]
            names |= {self.graph.spec.nodes[e.sender].name, self.graph.spec.nodes[e.receiver].name}
        return [n.name for n in self.graph.spec.nodes if n.name in names]

    def edge_table(self) -> list[dict[str, Any]]:
        table = self.graph.edge_table(self.target)
        return [table[i] for i in self.edge_indices]

    @property
    def edges(self):
        import pandas as pd  # noqa: PLC0415

        return pd.DataFrame(self.edge_table())

    def has_edge(self, sender: str, receiver: str, kind: str | None = None) -> bool:
        return any(
            row["sender"] == sender
            and row["receiver"] == receiver
            and (kind is None or row["type"] == kind)
            for row in self.edge_table()
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(
            {
                "method": self.graph.method,
                "target": self.graph.target_names[self.target],
                "nodes": self.node_names,
                "edges": self.edge_table(),
            },
            indent=indent,
        )

    def to_dot(self) -> str:
        """Graphviz dot text: nodes ranked by layer, edges labelled by type and coloured by sign."""
        colors = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "mlp": "#ff7f0e"}
        rows = self.edge_table()
        peak = max((abs(r["score"]) for r in rows), default=1.0) or 1.0
        lines = [
            "digraph circuit {",
            "  rankdir=BT;",
            '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4"];',
        ]
        for name in self.node_names:
            lines.append(f'  "{name}";')
        for r in rows:
            color = colors.get(r["type"], "#555555")
            style = "solid" if r["score"] >= 0 else "dashed"
            width = 0.5 + 4.0 * abs(r["score"]) / peak
            lines.append(
                f'  "{r["sender"]}" -> "{r["receiver"]}" [label="{r["type"]} {r["score"]:.3g}", '
                f'color="{color}", style={style}, penwidth={width:.2f}];'
            )
        lines.append("}")
        return "\n".join(lines) + "\n"
