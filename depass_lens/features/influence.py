"""Influence on the targets through a graph's (absolute, row-normalised) edges, as circuit-tracer
ranks and prunes nodes.

Each receiver's incoming edges are made non-negative and divided by their sum: ``N[b, a]`` is the
fraction of ``b``'s input that comes from ``a``. A node's influence is the target weight that
reaches it along every path, ``w (N + N^2 + ...)``, a finite sum because the graph is acyclic
(every edge goes forward in the model). Receivers' rows are enough: a node that receives
nothing passes nothing on.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def normalised(edges: Float[Tensor, "receivers nodes"]) -> Float[Tensor, "receivers nodes"]:
    """``|edges|`` with each row summing to 1 (rows of zeros stay zero)."""
    magnitude = edges.abs()
    total = magnitude.sum(-1, keepdim=True)
    return magnitude / torch.where(total > 0, total, torch.ones_like(total))


def influence(
    edges: Float[Tensor, "receivers nodes"],
    receivers: Int[Tensor, " receivers"],
    seed: Float[Tensor, " receivers"],
    max_steps: int = 1000,
) -> Float[Tensor, " nodes"]:
    """``seed N + seed N^2 + ...`` with ``N = normalised(edges)`` acting from receiver rows to
    node columns (``seed``: weight per receiver row, e.g. each target's probability); a node that
    is itself a receiver passes what reaches it on through its own row. Not counting the seed
    itself (circuit-tracer's node influence)."""
    N = normalised(edges)
    total = edges.new_zeros(edges.shape[1])
    current = seed
    for _ in range(max_steps):
        reached = current @ N
        if not bool(reached.any()):
            return total
        total += reached
        current = reached[receivers]
    raise RuntimeError(f"influence did not settle in {max_steps} steps: the graph has a cycle")


def next_receivers(
    edges: Float[Tensor, "receivers nodes"],
    receivers: Int[Tensor, " receivers"],
    seed: Float[Tensor, " receivers"],
    candidates: Bool[Tensor, " nodes"],
    k: int,
) -> Int[Tensor, " k"]:
    """The ``k`` candidate nodes (not yet computed) with the most influence so far."""
    score = influence(edges, receivers, seed)
    score = torch.where(candidates, score, torch.full_like(score, -1.0))
    k = min(k, int(candidates.sum()))
    return score.topk(k).indices


__all__ = ["influence", "next_receivers", "normalised"]
