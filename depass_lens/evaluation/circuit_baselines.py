"""The field's edge-attribution baselines, in DePass's graph format, on the same split inputs.

- **EAP** (edge attribution patching; Syed et al. 2023): ``e(A -> B) = <out_A(clean) -
  out_A(corrupt), dm/d in_B>`` with the real model's gradient at the clean prompt.
- **EAP-IG** (Hanna et al. 2024): the same with the gradient averaged over inputs whose token
  embeddings move from the corrupted prompt's to the clean prompt's (midpoint rule, ``steps``
  points; the reference implementation uses a left Riemann sum).
- **ACDC-style greedy patching** (Conmy et al. 2023): from the full graph, receivers from the
  target backwards, try removing each incoming edge (one patched forward each) and keep it
  removed if the metric moves by less than ``tau`` times the clean-corrupt gap.

EAP and EAP-IG are oriented as importance (clean minus corrupt), like contrastive DePass graphs;
rankings use absolute values anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapter import ModelAdapter
from depass_lens.circuits.build import (
    SlotBlock,
    backward_jobs,
    contract,
    graph_pass,
    plain_activations,
    slot_blocks,
    slots,
)
from depass_lens.circuits.extract import patchable
from depass_lens.circuits.graph import Graph
from depass_lens.circuits.patching import EdgePatcher
from depass_lens.circuits.receivers import projects_heads
from depass_lens.circuits.spec import GraphSpec, sender_outputs
from depass_lens.errors import DePassInputError
from depass_lens.targets import Target

#: Integration points of EAP-IG here (the cost is one forward and one backward per point).
EAP_IG_STEPS = 20


def _check(spec: GraphSpec) -> None:
    if any(node.kind == "neurons" for node in spec.nodes):
        raise DePassInputError("the gradient baselines score whole MLPs, not neuron groups")


def eap_graph(
    adapter: ModelAdapter,
    spec: GraphSpec,
    tokens: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    targets: Sequence[Target],
    target_names: list[str],
    attention_mask: Tensor | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> Graph:
    """EAP (``steps=None``) or EAP-IG (``steps`` integration points) as a :class:`Graph`."""
    _check(spec)
    if corrupted.shape != tokens.shape:
        raise DePassInputError("EAP needs corrupted prompts of the same shape as the prompts")
    clean = plain_activations(adapter, spec, tokens, attention_mask, targets)
    corrupt = plain_activations(adapter, spec, corrupted, attention_mask, targets)
    the_slots = slots(spec)
    projected = projects_heads(adapter, None, linearise=False)
    alphas: list[float | None] = [None]
    if steps is not None:  # midpoints of ``steps`` equal intervals of [0, 1]
        alphas = [(k + 0.5) / steps for k in range(steps)]
    sums: list[list[SlotBlock]] | None = None
    values: list[Tensor] = []
    points = tqdm(alphas, desc="EAP-IG", leave=False, delay=2.0) if progress else alphas
    for alpha in points:
        override = None
        if alpha is not None:  # token embeddings on the straight path corrupt -> clean
            start = corrupt["hook_embed"]
            override = start + alpha * (clean["hook_embed"] - start)
        passed = graph_pass(
            adapter,
            spec,
            tokens,
            attention_mask,
            targets,
            rule=None,
            split=None,
            linearise=False,
            embed_override=override,
            projected=projected,
        )
        per_target = []
        for value, _, grads, _ in backward_jobs(
            adapter, spec, passed, tokens, attention_mask, targets, projected=projected
        ):
            with torch.no_grad():
                acts = passed.activations
                blocks = slot_blocks(
                    adapter, spec, the_slots, grads, acts, projected=projected, exact=True
                )
                per_target.append([SlotBlock.holding(b.slots, b.gradients()) for b in blocks])
            if alpha is None:
                values.append(value)
        sums = (
            per_target
            if sums is None
            else [[_add(a, b) for a, b in zip(x, y)] for x, y in zip(sums, per_target)]
        )
    assert sums is not None
    with torch.no_grad():
        outputs = sender_outputs(adapter, spec, clean, minus=corrupt)
        edge_scores = torch.stack(
            [contract(spec, the_slots, blocks, outputs) / len(alphas) for blocks in sums], 1
        )
    batch, n_t = edge_scores.shape[:2]
    zeros = edge_scores.new_zeros(batch, n_t, len(spec.nodes))
    return Graph(
        spec=spec,
        edge_scores=edge_scores,
        node_scores=zeros,
        node_inputs=zeros.clone(),
        own_bias=zeros.clone(),
        target_names=target_names,
        target_values=torch.stack(values, 1) if values else edge_scores.new_zeros(batch, n_t),
        method="eap" if steps is None else "eap-ig",
        contrast=True,
        meta={"steps": steps} if steps is not None else {},
    )


def _add(a: SlotBlock, b: SlotBlock) -> SlotBlock:
    """Two formed gradient blocks of the same inputs, summed (``None`` is zero)."""
    first, second = a.gradients(), b.gradients()
    if first is None or second is None:
        return a if second is None else b
    return SlotBlock.holding(a.slots, first + second)


@dataclass
class AcdcResult:
    """Circuits found by greedy patching at each threshold, and the effect of each edge when it
    was tried (at the smallest threshold): ``|metric change| / |clean - corrupt gap|``."""

    thresholds: list[float]
    circuits: list[Bool[Tensor, " edge"]]
    effects: Float[Tensor, " edge"]
    forwards: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def graph(self, spec: GraphSpec, target_names: list[str]) -> Graph:
        scores = self.effects.view(1, 1, -1)
        zeros = scores.new_zeros(1, 1, len(spec.nodes))
        return Graph(
            spec,
            scores,
            zeros,
            zeros.clone(),
            zeros.clone(),
            target_names,
            scores.new_zeros(1, 1),
            method="acdc",
            contrast=True,
            meta={"thresholds": self.thresholds, "forwards": self.forwards},
        )


def acdc(patcher: EdgePatcher, thresholds: Sequence[float], progress: bool = False) -> AcdcResult:
    """ACDC-style greedy edge removal at each threshold (largest first, each run from scratch).

    Receivers are visited from the target backwards; a receiver none of whose outputs is still
    in the circuit loses all its inputs at once (they can no longer matter), otherwise each
    incoming edge is tried in turn (latest sender first).
    """
    import time  # noqa: PLC0415

    spec = patcher.spec
    movable = patchable(spec)
    gap = abs(patcher.clean - patcher.corrupt) or 1.0
    order = sorted(
        {e.receiver for e in spec.edges},
        key=lambda r: -(spec.nodes[r].read or 0.0),
    )
    effects = torch.zeros(len(spec.edges))
    circuits = []
    forwards = 0
    start_time = time.perf_counter()
    for tau in sorted(thresholds, reverse=True):
        keep = movable.clone()
        current = patcher.evaluate(keep).circuit
        forwards += 1
        bar = tqdm(order, desc=f"ACDC tau={tau:g}", leave=False, delay=2.0, disable=not progress)
        for receiver in bar:
            incoming = [
                i for i, e in enumerate(spec.edges) if e.receiver == receiver and movable[i]
            ]
            node = spec.nodes[receiver]
            if node.kind != "target" and not any(
                keep[i] for i, e in enumerate(spec.edges) if e.sender == receiver
            ):
                keep[incoming] = False
                continue
            for i in sorted(incoming, key=lambda j: -spec.edges[j].sender):
                keep[i] = False
                value = patcher.evaluate(keep).circuit
                forwards += 1
                change = abs(value - current) / gap
                if tau == min(thresholds):
                    effects[i] = change
                if change < tau:
                    current = value
                else:
                    keep[i] = True
        circuits.append(keep.clone())
    taus = sorted(thresholds, reverse=True)
    return AcdcResult(taus, circuits, effects, forwards, time.perf_counter() - start_time)
