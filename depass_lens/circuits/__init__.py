"""Circuits: exact edge attribution with conservation at every node, extraction, patching.

>>> graph = dp_model.graph(prompts, dp.LogitDiff(" Mary", " John"), attention="symmetric")
>>> graph.edges.head()               # tidy table: sender, receiver, type (q/k/v/mlp/direct), score
>>> graph.conservation()             # {'outgoing': 1e-16, 'incoming': ..., ...}
>>> circuit = graph.circuit(k=20)    # the 20 strongest edges, pruned to input-to-target paths
>>> print(circuit.to_dot())          # Graphviz
"""

from depass_lens.circuits.circuit import Circuit
from depass_lens.circuits.extract import prune, rank_edges, select_edges, smallest_circuit
from depass_lens.circuits.graph import Graph
from depass_lens.circuits.spec import Edge, GraphNodes, GraphSpec, Node, build_spec

__all__ = [
    "Circuit",
    "Edge",
    "Graph",
    "GraphNodes",
    "GraphSpec",
    "Node",
    "build_spec",
    "prune",
    "rank_edges",
    "select_edges",
    "smallest_circuit",
]
