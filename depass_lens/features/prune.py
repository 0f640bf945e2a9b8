"""Pruning a feature graph and scoring it, as circuit-tracer does.

Influence (:mod:`.influence`) ranks nodes: a node's share of the targets' weight (each target
weighted by its probability, or 1) reaching it through row-normalised absolute edges. Pruning
keeps the nodes holding ``node_threshold`` of the total influence, then the edges holding
``edge_threshold`` of the influence-weighted edge mass, then drops latents and errors left with
no outgoing (latents: or incoming) edge, until nothing changes. Inputs (tokens, positions,
constants) and targets always stay.

Scores: circuit-tracer's *replacement* (the influence reaching inputs, against inputs plus
errors) and *completeness* (each node's non-error share of its input, weighted by influence);
here positions and constants count as inputs, which circuit-tracer has no nodes for. And the exact
*error share*: the part of each target its error nodes carry directly, a signed fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from depass_lens.errors import DePassInputError
from depass_lens.features.graph import FeatureGraph
from depass_lens.features.influence import influence, normalised

INPUT_KINDS = ("token", "position", "constant")


def target_weights(graph: FeatureGraph) -> Float[Tensor, " rows"]:
    """Each computed row's seed weight: a target's probability (``"top_logits"``) or 1, a
    latent's 0."""
    weights = graph.edges.new_zeros(len(graph.receivers))
    probabilities = graph.settings.get("target_probabilities")
    for k, node in enumerate(graph.targets):
        row = graph.row(node)
        weights[row] = 1.0 if probabilities is None else float(probabilities[k])
    return weights


def _mask_of(graph: FeatureGraph, kinds: tuple[str, ...]) -> Bool[Tensor, " nodes"]:
    return torch.tensor([n.kind in kinds for n in graph.nodes], device=graph.edges.device)


def _cut_at(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the largest ones holding ``fraction`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return ordered.new_tensor(float("inf"))
    cumulative = ordered.cumsum(0) / total
    where = int(torch.searchsorted(cumulative, cumulative.new_tensor(fraction)))
    return ordered[min(where, len(ordered) - 1)]


@dataclass
class Pruned:
    """What pruning keeps: a node mask, an edge mask aligned with ``graph.edges`` (``[rows,
    nodes]``), each node's influence and its cumulative influence rank (circuit-tracer's
    ``cumulative_scores``)."""

    nodes: Bool[Tensor, " nodes"]
    edges: Bool[Tensor, "rows nodes"]
    influence: Float[Tensor, " nodes"]
    cumulative: Float[Tensor, " nodes"]


def prune(graph: FeatureGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's ``prune_graph`` on a DePass feature graph (see the module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise DePassInputError(f"{name} must be in [0, 1], got {value}")
    rows, receivers = graph.edges.detach(), graph.receivers
    weights = target_weights(graph)
    reach = influence(rows, receivers, weights)
    always = _mask_of(graph, (*INPUT_KINDS, "target"))
    keep = (reach >= _cut_at(reach, node_threshold)) | always
    pruned = rows.clone()
    pruned[~keep[receivers]] = 0
    pruned[:, ~keep] = 0
    passed = influence(pruned, receivers, weights)[receivers] + weights
    edge_scores = normalised(pruned) * passed[:, None]
    edges = (edge_scores >= _cut_at(edge_scores, edge_threshold)) & (edge_scores > 0)
    latent = _mask_of(graph, ("latent",))
    prunable = _mask_of(graph, ("latent", "error"))
    while True:
        before = keep.clone()
        edges[~keep[receivers]] = False
        edges[:, ~keep] = False
        keep &= ~prunable | edges.any(0)  # latents and errors must send somewhere
        receives = torch.zeros_like(keep)
        receives[receivers] = edges.any(1)
        keep &= ~latent | receives  # latents must receive from somewhere
        if bool((keep == before).all()):
            break
    ordered, order = reach.sort(descending=True)
    cumulative = torch.zeros_like(reach)
    total = ordered.sum()
    cumulative[order] = ordered.cumsum(0) / (total if total > 0 else 1.0)
    return Pruned(keep, edges, reach, cumulative)


def graph_scores(graph: FeatureGraph) -> dict[str, float]:
    """``replacement``, ``completeness`` (circuit-tracer's, inputs = tokens, positions and
    constants) and ``error_share`` (errors' exact direct share of the first target)."""
    rows, receivers = graph.edges.detach(), graph.receivers
    weights = target_weights(graph)
    reach = influence(rows, receivers, weights)
    errors = _mask_of(graph, ("error",))
    inputs = _mask_of(graph, INPUT_KINDS)
    reached_inputs, reached_errors = reach[inputs].sum(), reach[errors].sum()
    replacement = reached_inputs / (reached_inputs + reached_errors)
    output = reach.clone()
    output[receivers] += weights
    non_error = torch.ones_like(output)  # a node with no incoming edges has no error input
    non_error[receivers] = 1 - normalised(rows)[:, errors].sum(-1)
    completeness = (non_error * output).sum() / output.sum()
    return {
        "replacement": float(replacement),
        "completeness": float(completeness),
        "error_share": graph.error_share(),
    }


__all__ = ["INPUT_KINDS", "Pruned", "graph_scores", "prune", "target_weights"]
