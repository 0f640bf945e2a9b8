"""What a circuit graph holds: edge scores with their nodes, node scores, and the checks.

A :class:`Graph` keeps every score per prompt and per scalar target (``batch target edge``);
tables (:attr:`Graph.nodes`, :attr:`Graph.edges`) average over the batch. Conservation is
exact for DePass graphs (:meth:`Graph.conservation`): a node's outgoing edges sum to its score,
its incoming edges sum to the score of its input, and (absolute graphs) its input's score plus its
own constants is its score. Baseline graphs (EAP, EAP-IG, ACDC) share the format but not the laws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.checks import check_count, check_index
from depass_lens.circuits.circuit import Circuit
from depass_lens.circuits.extract import rank_edges, select_edges
from depass_lens.circuits.spec import GraphSpec


@dataclass
class Graph:
    """Edge attributions of one model on one batch of prompts.

    Attributes:
        spec: the nodes and edges.
        edge_scores: ``batch target edge``: the share of each target carried by each edge.
        node_scores: ``batch target node``: a sender's share ``<out, h>``; the target node holds
            the target's value (its change, in a contrastive graph).
        node_inputs: ``batch target node``: ``<in_B, g_B>``, the share carried by what a
            receiver reads (sum over its query, key and value for a head).
        own_bias: ``batch target node``: each receiver's own constants ``<c_B, h_B>`` (absolute
            graphs; zero in contrastive graphs, where constants cancel).
        target_names / target_values: one per scalar target (values of the clean prompts).
        method: ``"depass"``, ``"eap"``, ``"eap-ig"``, ``"acdc"``, ...
        attention: the attention split (DePass) or ``None``.
        contrast: whether scores are relative to a corrupted prompt.
        linearisation: for contrastive DePass graphs, ``"difference"`` (the exact secant map of
            clean - corrupted changes) or ``"clean"`` (the clean run's frozen linearisation).
        edge_scores_by_pos: ``batch target edge pos`` when token-resolved (else ``None``).
    """

    spec: GraphSpec
    edge_scores: Float[Tensor, "batch target edge"]
    node_scores: Float[Tensor, "batch target node"]
    node_inputs: Float[Tensor, "batch target node"]
    own_bias: Float[Tensor, "batch target node"]
    target_names: list[str]
    target_values: Float[Tensor, "batch target"]
    method: str = "depass"
    attention: str | None = None
    contrast: bool = False
    edge_scores_by_pos: Float[Tensor, "batch target edge pos"] | None = None
    str_tokens: list[list[str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    linearisation: str | None = None

    @property
    def exact(self) -> bool:
        """Whether node scores, own terms and edges form one exact flow (absolute DePass
        graphs, and contrastive ones with the difference linearisation)."""
        return self.method == "depass" and (not self.contrast or self.linearisation == "difference")

    def __repr__(self) -> str:
        b, t, e = self.edge_scores.shape
        return (
            f"Graph({self.method}, {self.describe()}, nodes={len(self.spec.nodes)}, edges={e}, "
            f"batch={b}, targets={t})"
        )

    def describe(self) -> str:
        """How the scores were computed, in words: absolute or contrastive, and how attention is
        treated (a split, or the secant of the softmax under the difference linearisation)."""
        if not self.contrast:
            kind = "absolute"
        elif self.linearisation is None:
            kind = "contrastive"
        else:
            kind = f"contrastive, {self.linearisation} linearisation"
        if self.attention is not None:
            return f"{kind}, attention={self.attention}"
        if self.method == "depass" and self.linearisation == "difference":
            return f"{kind} (the secant of every nonlinearity, attention included)"
        return kind

    # ------------------------------------------------------------------ views
    @property
    def n_edges(self) -> int:
        return len(self.spec.edges)

    def mean(self) -> Graph:
        """The batch average (a graph with batch 1)."""

        def avg(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.mean(0, keepdim=True)

        return replace(
            self,
            edge_scores=avg(self.edge_scores),  # type: ignore[arg-type]
            node_scores=avg(self.node_scores),  # type: ignore[arg-type]
            node_inputs=avg(self.node_inputs),  # type: ignore[arg-type]
            own_bias=avg(self.own_bias),  # type: ignore[arg-type]
            target_values=avg(self.target_values),  # type: ignore[arg-type]
            edge_scores_by_pos=avg(self.edge_scores_by_pos),
            str_tokens=self.str_tokens[:1] if self.str_tokens else None,
        )

    def scores(self, target: int = 0) -> Float[Tensor, " edge"]:
        """Batch-mean edge scores for one scalar target."""
        return self.edge_scores[:, self._target_index(target)].mean(0)

    def _target_index(self, target: int) -> int:
        """``target`` as an index into the scalar targets (negative from the end), else an error."""
        names = self.target_names
        return check_index(target, len(names), "target", of=f"for the targets {names}")

    def edge_name(self, index: int) -> str:
        """``"sender -> receiver (kind)"`` for edge ``index`` (``0..n_edges-1``)."""
        index = check_index(index, self.n_edges, "edge index", of=f"for {self.n_edges} edges")
        e = self.spec.edges[index]
        return f"{self.spec.nodes[e.sender].name} -> {self.spec.nodes[e.receiver].name} ({e.kind})"

    def top(self, k: int = 10, target: int = 0) -> list[tuple[str, float]]:
        """The ``k`` edges with the largest |batch-mean score|, excluding constant senders."""
        k = check_count(k, "k")
        scores = self.scores(target)
        order = rank_edges(self.spec, scores)[:k]
        return [(self.edge_name(int(i)), float(scores[i])) for i in order]

    def node_table(self, target: int = 0) -> list[dict[str, Any]]:
        """One row per node (batch means): score, input score, own constants, in/outflow."""
        target = self._target_index(target)
        mean = self.mean()
        edges = mean.edge_scores[0, target]
        outflow = torch.zeros(len(self.spec.nodes), dtype=edges.dtype)
        inflow = torch.zeros_like(outflow)
        senders = torch.tensor([e.sender for e in self.spec.edges], dtype=torch.long)
        receivers = torch.tensor([e.receiver for e in self.spec.edges], dtype=torch.long)
        outflow.index_add_(0, senders, edges.detach().cpu())
        inflow.index_add_(0, receivers, edges.detach().cpu())
        rows = []
        for i, node in enumerate(self.spec.nodes):
            rows.append(
                {
                    "node": node.name,
                    "kind": node.kind,
                    "layer": node.layer,
                    "index": node.index,
                    "score": float(mean.node_scores[0, target, i]),
                    "input": float(mean.node_inputs[0, target, i]),
                    "own_bias": float(mean.own_bias[0, target, i]),
                    "inflow": float(inflow[i]) if node.receives else None,
                    "outflow": float(outflow[i]) if node.sends else None,
                }
            )
        return rows

    def edge_table(self, target: int = 0) -> list[dict[str, Any]]:
        """One row per edge (batch means): sender, receiver, type, score."""
        scores = self.scores(target).detach().cpu()
        return [
            {
                "sender": self.spec.nodes[e.sender].name,
                "receiver": self.spec.nodes[e.receiver].name,
                "type": e.kind,
                "score": float(scores[i]),
            }
            for i, e in enumerate(self.spec.edges)
        ]

    @property
    def nodes(self):
        """Tidy node table (pandas DataFrame) for target 0; see :meth:`node_table`."""
        import pandas as pd  # noqa: PLC0415 - a TransformerLens dependency, imported on use

        return pd.DataFrame(self.node_table())

    @property
    def edges(self):
        """Tidy edge table (pandas DataFrame) for target 0, largest |score| first."""
        import pandas as pd  # noqa: PLC0415

        table = pd.DataFrame(self.edge_table())
        return table.reindex(table["score"].abs().sort_values(ascending=False).index)

    # ------------------------------------------------------------------ checks
    def conservation(self) -> dict[str, float]:
        """Largest relative violation of each conservation law, over prompts and targets.

        - ``outgoing``: a sender's edges sum to its score ``<out_A, h_A>``;
        - ``incoming``: a receiver's edges sum to its input's score ``<in_B, g_B>``;
        - ``node``: input score plus own terms is the node's score (own terms are a node's
          constants in an absolute graph, its quadrature remainder in a difference graph);
        - ``total``: the target (its change, in a difference graph) is the sources' scores
          (embeddings and output biases) plus every receiver's own terms.

        ``node`` and ``total`` are reported for exact graphs only (:attr:`exact`).
        """
        n = len(self.spec.nodes)
        batch, n_t, _ = self.edge_scores.shape
        edges = self.edge_scores
        senders = torch.tensor([e.sender for e in self.spec.edges], device=edges.device)
        receivers = torch.tensor([e.receiver for e in self.spec.edges], device=edges.device)
        outflow = edges.new_zeros(batch, n_t, n).index_add_(2, senders, edges)
        inflow = edges.new_zeros(batch, n_t, n).index_add_(2, receivers, edges)
        scale = self.target_values.abs().amax().clamp_min(1e-12)
        scale = torch.maximum(scale, self.node_scores.abs().amax())
        send = torch.tensor([node.sends for node in self.spec.nodes], device=edges.device)
        recv = torch.tensor([node.receives for node in self.spec.nodes], device=edges.device)

        def worst(gap: Tensor, where: Tensor) -> float:
            return float(gap[..., where].abs().amax() / scale) if bool(where.any()) else 0.0

        out = {
            "outgoing": worst(outflow - self.node_scores, send),
            "incoming": worst(inflow - self.node_inputs, recv),
        }
        if self.exact:
            node_gap = self.node_inputs + self.own_bias - self.node_scores
            out["node"] = worst(node_gap, recv)
            sources = torch.tensor(
                [node.sends and not node.receives for node in self.spec.nodes], device=edges.device
            )
            total = (self.node_scores * sources).sum(-1) + (self.own_bias * recv).sum(-1)
            value = self.node_scores[..., self.spec.target]
            out["total"] = float((total - value).abs().amax() / scale)
        return out

    # ------------------------------------------------------------------ circuits
    def circuit(
        self,
        k: int | None = None,
        *,
        threshold: float | None = None,
        target: int = 0,
        prune: bool = True,
    ) -> Circuit:
        """A circuit: the top ``k`` edges by |batch-mean score|, or every edge with |score| >=
        ``threshold``; then (``prune``) edges off every input-to-target path are dropped.

        Edges from constant senders (output biases) are never counted: their clean and corrupted
        values are equal, so patching cannot remove them. For the smallest circuit carrying a
        fraction of the target, see :func:`depass_lens.circuits.smallest_circuit`.
        """
        target = self._target_index(target)
        keep = select_edges(self, k=k, threshold=threshold, target=target, prune=prune)
        return Circuit(self, keep, target)

    # ------------------------------------------------------------------ export
    def to_dict(self, target: int = 0) -> dict[str, Any]:
        """Nodes and edges (batch means) of one scalar target, for JSON."""
        target = self._target_index(target)
        return {
            "method": self.method,
            "attention": self.attention,
            "contrast": self.contrast,
            "target": self.target_names[target],
            "target_value": float(self.target_values[:, target].mean()),
            "nodes": self.node_table(target),
            "edges": self.edge_table(target),
            "meta": self.meta,
        }

    def to_json(self, target: int = 0, indent: int | None = 1) -> str:
        """Nodes and edges (batch means) as JSON."""
        return json.dumps(self.to_dict(target), indent=indent)

    def to_dot(self, target: int = 0, k: int | None = 50) -> str:
        """Graphviz dot text of the ``k`` strongest edges (``None``: all)."""
        target = self._target_index(target)
        k = self.n_edges if k is None else check_count(k, "k")
        keep = torch.zeros(self.n_edges, dtype=torch.bool)
        keep[rank_edges(self.spec, self.scores(target))[:k]] = True
        return Circuit(self, keep, target).to_dot()
