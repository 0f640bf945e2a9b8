"""From scored graphs to circuits: top-k, thresholds, pruning, the smallest sufficient set.

Pruning keeps an edge only if it lies on some path from an input (the embeddings) to the target
through kept edges; edges off every such path change nothing when the rest is patched (a node
with no kept inputs sees its corrupted input and writes its corrupted output), so they only
clutter a circuit. Edges from constant senders are never selected: they cannot be patched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.circuits.circuit import Circuit
from depass_lens.circuits.spec import GraphSpec
from depass_lens.errors import DePassInputError

if TYPE_CHECKING:
    from depass_lens.circuits.graph import Graph


def rank_edges(spec: GraphSpec, scores: Float[Tensor, " edge"]) -> Int[Tensor, " edge"]:
    """Edge indices by decreasing |score|, constant senders (never patchable) last."""
    constant = torch.tensor(
        [spec.nodes[e.sender].kind == "bias" for e in spec.edges], device=scores.device
    )
    key = torch.where(constant, torch.full_like(scores, -1.0), scores.abs().to(scores.dtype))
    return key.argsort(descending=True, stable=True)


def patchable(spec: GraphSpec) -> Bool[Tensor, " edge"]:
    """Edges whose sender can differ between a clean and a corrupted run (not constants)."""
    return torch.tensor([spec.nodes[e.sender].kind != "bias" for e in spec.edges])


def prune(spec: GraphSpec, keep: Bool[Tensor, " edge"]) -> Bool[Tensor, " edge"]:
    """Keep only edges on a kept path from an input node to the target."""
    n = len(spec.nodes)
    kept = [i for i in keep.nonzero().flatten().tolist()]
    reaches = [False] * n  # reaches the target through kept edges
    reaches[spec.target] = True
    for i in sorted(kept, key=lambda j: -_order(spec, spec.edges[j].receiver)):
        e = spec.edges[i]
        if reaches[e.receiver]:
            reaches[e.sender] = True
    reached = [spec.nodes[i].kind in ("embed", "token") for i in range(n)]  # fed by an input
    for i in sorted(kept, key=lambda j: _order(spec, spec.edges[j].sender)):
        e = spec.edges[i]
        if reached[e.sender]:
            reached[e.receiver] = True
    out = keep.clone()
    for i in kept:
        e = spec.edges[i]
        out[i] = reaches[e.receiver] and reached[e.sender]
    return out


def _order(spec: GraphSpec, node: int) -> float:
    n = spec.nodes[node]
    return n.write if n.write is not None else float(n.read or 0.0)


def select_edges(
    graph: Graph,
    k: int | None = None,
    threshold: float | None = None,
    target: int = 0,
    prune: bool = True,
) -> Bool[Tensor, " edge"]:
    """The top ``k`` patchable edges by |batch-mean score| or those above ``threshold``."""
    if (k is None) == (threshold is None):
        raise DePassInputError("give exactly one of k (top edges) or threshold (a |score| bound)")
    scores = graph.scores(target).detach().cpu()
    movable = patchable(graph.spec)
    n_movable = int(movable.sum())
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    if k is not None:
        if not isinstance(k, int) or k < 0:
            raise DePassInputError(f"k must be a non-negative int, got {k!r}")
        if k > n_movable:
            raise DePassInputError(
                f"an edge budget of {k} is larger than the graph: it has {n_movable} patchable "
                f"edges ({graph.n_edges} in all, {graph.n_edges - n_movable} from constants)"
            )
        keep[rank_edges(graph.spec, scores)[:k]] = True
    else:
        assert threshold is not None
        if threshold < 0:
            raise DePassInputError(f"threshold must be >= 0, got {threshold}")
        keep = (scores.abs() >= threshold) & movable
    return _prune(graph.spec, keep) if prune else keep


_prune = prune


def smallest_circuit(
    graph: Graph,
    fraction: float,
    recovered: Callable[[Bool[Tensor, " edge"]], float],
    target: int = 0,
) -> tuple[Circuit, float]:
    """The smallest top-k circuit whose ``recovered(keep)`` (a normalised faithfulness: 0 with
    every edge patched, 1 with none) reaches ``fraction``.

    ``k`` is searched on a doubling grid and then bisected, so ``recovered`` runs about
    ``2 log2(n_edges)`` times (one patched forward each with :class:`~depass_lens.circuits.
    patching.EdgePatcher`). Faithfulness is not always monotone in ``k``; the result is the
    smallest ``k`` found whose value reaches ``fraction``, returned with that value.
    """
    if not 0 < fraction <= 1:
        raise DePassInputError(f"fraction must be in (0, 1], got {fraction}")
    n = int(patchable(graph.spec).sum())
    cache: dict[int, float] = {}

    def value(k: int) -> float:
        if k not in cache:
            cache[k] = recovered(select_edges(graph, k=k, target=target))
        return cache[k]

    high = 1
    while high < n and value(high) < fraction:
        high = min(2 * high, n)
    if value(high) < fraction:
        return Circuit(graph, select_edges(graph, k=n, target=target), target), value(n)
    low = high // 2  # value(low) < fraction (or low == 0)
    while high - low > 1:
        mid = (low + high) // 2
        if value(mid) >= fraction:
            high = mid
        else:
            low = mid
    return Circuit(graph, select_edges(graph, k=high, target=target), target), value(high)
