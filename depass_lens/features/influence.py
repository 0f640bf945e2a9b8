"""Influence on the targets through a graph's (absolute, row-normalised) edges, as circuit-tracer
ranks and prunes nodes.

Each receiver's incoming edges are made non-negative and divided by their sum: ``N[b, a]`` is the
fraction of ``b``'s input that comes from ``a``. A node's influence is the target weight that
reaches it along every path, ``w (N + N^2 + ...)``, a finite sum because the graph is acyclic
(every edge goes forward in the model).
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
    """``sum_k seed N^k`` restricted to the receivers' rows (``seed``: weight per receiver row,
    e.g. each target's probability), plus the seed itself on the receivers' own nodes.

    Sums until no weight is left to move (at most the graph's depth in steps)."""
    n_nodes = edges.shape[1]
    N = normalised(edges)
    # N acts from receiver rows to node columns; a node that is itself a receiver passes its
    # weight on through its own row.
    row_of = torch.full((n_nodes,), -1, dtype=torch.long, device=edges.device)
    row_of[receivers] = torch.arange(len(receivers), device=edges.device)
    total = edges.new_zeros(n_nodes)
    total[receivers] += seed
    current = seed
    for _ in range(max_steps):
        reached = current @ N  # weight on every node
        if not bool((reached > 0).any()):
            break
        total += reached
        has_row = row_of >= 0
        current = edges.new_zeros(len(receivers))
        current[row_of[has_row]] = reached[has_row]
    return total


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
