"""An offline, interactive viewer for feature attribution graphs (one self-contained HTML file).

>>> from depass_lens.explorer import write_explorer
>>> write_explorer(graph_json, "graph.html")   # open it in any browser, no network needed

The page reads the graph JSON (``format: "depass_lens.feature_graph/1"``) embedded in it: a grid
of layers by token positions, nodes coloured by signed attribution and sized by influence, a side
panel with the selected node's incoming and outgoing edges, edge-kind filters, search, and a pinned
subgraph that can be grouped into supernodes and exported as JSON.
"""

from __future__ import annotations

from depass_lens.explorer.page import (
    EDGE_KINDS,
    FORMAT,
    NODE_KINDS,
    explorer_html,
    validate_graph,
    write_explorer,
)

__all__ = [
    "EDGE_KINDS",
    "FORMAT",
    "NODE_KINDS",
    "explorer_html",
    "validate_graph",
    "write_explorer",
]
