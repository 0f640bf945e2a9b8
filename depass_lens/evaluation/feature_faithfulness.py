"""Faithfulness of feature attributions by intervention, every method on one harness.

The harness is the model with its dictionaries spliced in
(:class:`~depass_lens.evaluation.feature_patching.SplicedModel`: each replaced module's output is
its latents' reconstruction, the latents computed live by their encoders, plus the error frozen
at its clean value, so the spliced model reproduces the model). Every method scores each latent
at each position of each prompt; from its scores it *estimates* the change of the metric when a
latent moves from a reference value ``b`` (zero, or a corrupted prompt's activation) to its clean
value ``a``:

- DePass feature graphs on the clean prompt (``attention="value"`` / ``"symmetric"``): the
  latent's share of the target (its direct edge into it) is ``a <W_dec, g>``, linear in the
  coefficient ``a``, so moving from ``b`` is estimated as ``share * (a - b) / a``.
- The contrastive graph (``contrast=``): the share of the latent's change ``a - a_corrupt`` in
  the change of the target (only with the corrupted reference).
- The frozen-attention graph with circuit-tracer's conventions (value, position 0 left out): ranks
  by circuit-tracer's influence (:func:`depass_lens.features.influence.influence`), estimates
  with its own direct shares.
- ``*-total`` variants (value, symmetric, contrast): each latent's share plus what it sends
  through every later latent (:func:`total_shares`: signed flow of the graph's exact edges).
- Attribution patching on latents: ``(a - b) dm/da`` at the clean run, gradients through the
  spliced model (later latents respond through their encoders).
- Integrated gradients on latents (Sparse Feature Circuits): per site, latents on the straight
  path from ``b`` to ``a`` with the other sites live, ``steps`` midpoints.

Two protocols:

(a) :func:`ablation_agreement`: zero-ablate (or mean-ablate, or patch to corrupted) each
    method's top-n latents by |score| per prompt, all at once, in the spliced model (the other
    latents live, errors frozen); compare the measured change of the metric with the method's
    prediction (minus the sum of the ablated latents' estimates): correlation across prompts and
    relative error, per n.
(b) :func:`faithfulness_curves`: on the clean prompt keep each method's top-n latents (held at
    their clean activations, ``"fixed"``, or recomputed by their encoders, ``"live"``) and hold
    every other latent at its corrupted activation, errors frozen at their clean values;
    faithfulness
    ``(m(circuit) - m(none)) / (m(all) - m(none))`` (batch means; ``m(all)`` is the clean model
    exactly, ``m(none)``: every latent corrupted) against the number of latents kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

import depass_lens as dp
from depass_lens.errors import DePassInputError
from depass_lens.evaluation.agreement import spearman
from depass_lens.evaluation.circuit_faithfulness import CircuitCurve, budget_grid, wins
from depass_lens.evaluation.curves import trapezoid_area
from depass_lens.evaluation.feature_patching import (
    LatentTensors,
    Metric,
    Patch,
    SplicedModel,
    attribution_patching,
    flatten,
    integrated_gradients,
    top_n_mask,
    unflatten,
)
from depass_lens.evaluation.metrics import logit_diff_metric
from depass_lens.evaluation.sae_faithfulness import (
    FaithfulnessResult,
    ablation_effects,
    compare,
    removal_drop,
    sae_faithfulness,
    setup,
)
from depass_lens.evaluation.sae_faithfulness import logit_diff_metric as sae_logit_diff
from depass_lens.features.graph import FeatureGraph
from depass_lens.features.influence import influence
from depass_lens.sae.view import as_sae_view

Reference = Literal["zero", "mean", "corrupted"]
Circuit = Literal["live", "fixed"]

#: Graph methods: name -> feature_graph keywords (``contrast``: the prompt's corrupted
#: counterpart).
GRAPH_METHODS: dict[str, dict[str, Any]] = {
    "depass-value": {"attention": "value"},
    "depass-symmetric": {"attention": "symmetric"},
    "depass-contrast": {"contrast": True},
    "circuit-tracer": {"attention": "value", "zero_first_position": True},
    "depass-contrast-total": {"contrast": True},
    "depass-value-total": {"attention": "value"},
    "depass-symmetric-total": {"attention": "symmetric"},
}
#: Methods whose scores need every latent's incoming edges (a full graph).
FULL_GRAPH = (
    "circuit-tracer",
    "depass-contrast-total",
    "depass-value-total",
    "depass-symmetric-total",
)
BASELINES = ("attribution patching", "integrated gradients", "circuit-tracer")
#: Integration points of integrated gradients per site (Sparse Feature Circuits uses 10).
IG_STEPS = 10


# ---------------------------------------------------------------------------- graph scores
def total_shares(
    graph: FeatureGraph, coefficient: Tensor | None = None, target: int = 0
) -> Float[Tensor, " nodes"]:
    """Each node's direct share of the target plus what it sends through every later latent.

    A latent ``B`` passes its own total ``T_B`` on to its senders in proportion to their edges
    into its pre-activation: ``T_A += edge(A -> B) * s_B * T_B / c_B``, with ``c_B`` what
    multiplies ``B``'s decoder in the graph (its activation; with a contrast, its change
    ``coefficient``) and ``s_B`` the slope of its activation against its pre-activation (``c_B /
    value_B``, clamped to [0, 1]: 1 for a latent active in both runs, less for one a ReLU switched
    on, at most 1 for a TopK gate that flipped). That is the linear effect of ``A`` through ``B``
    with ``B``'s encoder live. Sites are visited from the last; where every slope is 1 the source
    nodes' totals still add up to the target (each latent's incoming edges sum to its
    pre-activation). Needs every latent's incoming edges (a graph without ``max_feature_nodes``).
    """
    contrast = graph.attention == "difference"
    if contrast and coefficient is None:
        raise DePassInputError("a contrastive graph's totals need each latent's change")
    coeff = graph.activation if coefficient is None else coefficient
    total = graph.target_scores(target).clone()
    rows_by_site: dict[str, list[int]] = {}
    for row, node in enumerate(graph.receivers.tolist()):
        site = graph.nodes[node].site
        if graph.nodes[node].kind == "latent" and site is not None:
            rows_by_site.setdefault(site, []).append(row)
    n_latents = sum(n.kind == "latent" for n in graph.nodes)
    if sum(len(r) for r in rows_by_site.values()) != n_latents:
        raise DePassInputError("total_shares needs every latent's incoming edges (a full graph)")
    for site in reversed(list(graph.settings["sites"])):
        rows = torch.tensor(rows_by_site.get(site, []), dtype=torch.long)
        if rows.numel() == 0:
            continue
        nodes = graph.receivers[rows]
        c, pre = coeff[nodes].to(total.dtype), graph.value[nodes]
        slope = torch.where(pre != 0, c / torch.where(pre != 0, pre, 1.0), 0.0).clamp(0.0, 1.0)
        per_unit = torch.where(c != 0, total[nodes] * slope / torch.where(c != 0, c, 1.0), 0.0)
        total = total + per_unit @ graph.edges[rows]
    return total


# ---------------------------------------------------------------------------- method scores
@dataclass
class GraphScores:
    """A graph method's direct (or total) share of the target per latent, one graph per prompt,
    and what it ranks by where that is not the share (circuit-tracer's influence)."""

    shares: LatentTensors
    influence: LatentTensors | None = None
    seconds: float = 0.0


def _dense(graph: FeatureGraph, values: Tensor, out: LatentTensors, prompt: int) -> None:
    """Write latent nodes' ``values`` into ``out[site][prompt, pos, index]``."""
    by_site: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for j, node in enumerate(graph.nodes):
        if node.kind == "latent" and node.site is not None:
            cols, pos, idx = by_site.setdefault(node.site, ([], [], []))
            cols.append(j)
            pos.append(int(node.pos or 0))
            idx.append(int(node.index or 0))
    for site, (cols, pos, idx) in by_site.items():
        target = out[site]
        target[prompt, pos, idx] = values[cols].detach().to(target.device, target.dtype)


def _gather(graph: FeatureGraph, dense: LatentTensors, out: Tensor, prompt: int) -> None:
    """Read ``dense[site][prompt, pos, index]`` into ``out`` at every latent node."""
    for j, node in enumerate(graph.nodes):
        if node.kind == "latent" and node.site is not None:
            out[j] = dense[node.site][prompt, node.pos, node.index]


def graph_scores(
    spliced: SplicedModel,
    answers: Tensor,
    wrong: Tensor,
    methods: Sequence[str],
    corrupted: Tensor | None = None,
    progress: bool = False,
) -> dict[str, GraphScores]:
    """Each of ``methods``' (keys of :data:`GRAPH_METHODS`) scores of every latent on every
    prompt of the spliced model's batch: one feature graph per prompt and graph setting (methods
    with the same setting share it: a full graph where one needs it), target ``logit(answer) -
    logit(wrong)`` at the last position. Seconds are per shared graph."""
    unknown = [m for m in methods if m not in GRAPH_METHODS]
    if unknown:
        raise DePassInputError(f"unknown graph methods {unknown}; one of {sorted(GRAPH_METHODS)}")
    groups: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for m in methods:
        groups.setdefault(tuple(sorted(GRAPH_METHODS[m].items())), []).append(m)
    depass = dp.DePass(spliced.model, progress=False)
    out: dict[str, GraphScores] = {}
    for setting, members in groups.items():
        options = dict(setting)
        contrast = bool(options.pop("contrast", False))
        if contrast and corrupted is None:
            raise DePassInputError(f"{members} need corrupted prompts")
        changes = None
        if contrast and corrupted is not None:
            reference = spliced.record(corrupted)
            changes = {n: spliced.clean[n].acts - reference[n].acts for n in spliced.names}
        full = any(m in FULL_GRAPH for m in members)
        shares = {
            m: {n: torch.zeros_like(r.acts) for n, r in spliced.clean.items()} for m in members
        }
        ranks = {n: torch.zeros_like(r.acts) for n, r in spliced.clean.items()}
        start = time.perf_counter()
        prompts = range(spliced.tokens.shape[0])
        label = ", ".join(members)
        for b in tqdm(prompts, desc=label, leave=False, delay=2.0, disable=not progress):
            graph = depass.feature_graph(
                spliced.tokens[b : b + 1],
                dp.LogitDiff(int(answers[b]), int(wrong[b])),
                dictionaries=spliced.dictionaries,
                contrast=corrupted[b : b + 1] if contrast and corrupted is not None else None,
                edge_kinds=False,
                max_feature_nodes=None if full else 0,
                **options,
            )
            for m in members:
                if m.endswith("-total"):
                    change = None
                    if changes is not None:  # a - a_corrupt of every latent node
                        change = torch.full_like(graph.activation, math.nan)
                        _gather(graph, changes, change, b)
                    _dense(graph, total_shares(graph, change), shares[m], b)
                else:
                    _dense(graph, graph.target_scores(), shares[m], b)
            if "circuit-tracer" in members:
                seed = torch.tensor(
                    [float(graph.nodes[int(i)].kind == "target") for i in graph.receivers],
                    dtype=graph.edges.dtype,
                    device=graph.edges.device,
                )
                _dense(graph, influence(graph.edges, graph.receivers, seed), ranks, b)
        seconds = time.perf_counter() - start
        for m in members:
            out[m] = GraphScores(shares[m], ranks if m == "circuit-tracer" else None, seconds)
    return {m: out[m] for m in methods}


@dataclass
class Scores:
    """A method's scores against one reference: ``estimate``, per latent, of the change of the
    metric when the latent moves from the reference to its clean value (the rest clean), and the
    ``key`` it ranks latents by (``|key|``, largest first)."""

    estimate: LatentTensors
    key: LatentTensors
    seconds: float = 0.0


def reference_acts(
    spliced: SplicedModel, reference: Reference, corrupted: Tensor | None = None
) -> LatentTensors:
    """Each latent's reference value: zero, its mean over the batch's prompts at the same
    position, or its activation on the corrupted prompt."""
    clean = {n: r.acts for n, r in spliced.clean.items()}
    if reference == "zero":
        return {n: torch.zeros_like(a) for n, a in clean.items()}
    if reference == "mean":
        return {n: a.mean(0, keepdim=True).expand_as(a) for n, a in clean.items()}
    if reference == "corrupted":
        if corrupted is None:
            raise DePassInputError("reference='corrupted' needs corrupted prompts")
        return {n: r.acts for n, r in spliced.record(corrupted).items()}
    raise DePassInputError(f"reference must be 'zero', 'mean' or 'corrupted', got {reference!r}")


def method_scores(
    spliced: SplicedModel,
    metric: Metric,
    graphs: Mapping[str, GraphScores],
    reference: LatentTensors,
    contrastive: bool,
    ig_steps: int = IG_STEPS,
) -> dict[str, Scores]:
    """Every method's :class:`Scores` against ``reference`` (``contrastive``: the reference is
    the corrupted prompt, which the contrastive graph explains; otherwise it is left out).

    A clean graph's share is linear in the latent's coefficient ``a``: moving from ``b`` is
    estimated as ``share * (a - b) / a``."""
    out: dict[str, Scores] = {}
    for name, g in graphs.items():
        if name.startswith("depass-contrast"):
            if contrastive:
                out[name] = Scores(g.shares, g.shares, g.seconds)
            continue
        estimate = {}
        for site, share in g.shares.items():
            a = spliced.clean[site].acts
            safe = torch.where(a != 0, a, torch.ones_like(a))
            estimate[site] = torch.where(a != 0, share * (a - reference[site]) / safe, 0.0)
        key = g.influence if g.influence is not None else estimate
        out[name] = Scores(estimate, key, g.seconds)
    start = time.perf_counter()
    atp = attribution_patching(spliced, metric, reference)
    out["attribution patching"] = Scores(atp, atp, time.perf_counter() - start)
    start = time.perf_counter()
    ig = integrated_gradients(spliced, metric, reference, ig_steps)
    out["integrated gradients"] = Scores(ig, ig, time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------------- (a) ablation
def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation (NaN when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else float("nan")


@dataclass
class AblationPoint:
    """Ablating a method's top-``n`` latents on every prompt: measured and predicted changes."""

    n: int
    measured: list[float]
    predicted: list[float]
    ablated: float  # mean number of latents ablated per prompt

    def stats(self) -> dict[str, float]:
        m, p = torch.tensor(self.measured), torch.tensor(self.predicted)
        scale = float(m.abs().mean())
        return {
            "n": self.n,
            "ablated": self.ablated,
            "pearson": pearson(p, m),
            "spearman": spearman(p, m),
            "relative_error": float((p - m).abs().mean()) / scale if scale > 0 else math.nan,
            "measured": float(m.mean()),
            "predicted": float(p.mean()),
        }


def _patches(
    mask: Tensor, values: LatentTensors, like: LatentTensors, names: Sequence[str]
) -> dict[str, Patch]:
    masks = unflatten(mask, like, names)
    return {n: Patch(masks[n], values[n].expand_as(like[n])) for n in names}


@torch.no_grad()
def ablation_agreement(
    spliced: SplicedModel,
    metric: Metric,
    scores: Mapping[str, Scores],
    reference: LatentTensors,
    budgets: Sequence[int],
) -> dict[str, list[AblationPoint]]:
    """(a): per method and ``n``, set each prompt's top-``n`` latents (by ``|key|``, among those
    whose clean value differs from the reference) to the reference, all at once, in the spliced
    model (other latents live, errors frozen): the measured change of the metric and the
    method's prediction, minus the sum of their estimates."""
    names = spliced.names
    clean_acts = {n: r.acts for n, r in spliced.clean.items()}
    candidates = flatten(
        {n: clean_acts[n] != reference[n].expand_as(clean_acts[n]) for n in names}, names
    )
    clean = metric(spliced.run())
    out: dict[str, list[AblationPoint]] = {}
    for name, s in scores.items():
        key, estimate = flatten(s.key, names), flatten(s.estimate, names)
        points = []
        for n in budgets:
            mask = top_n_mask(key, candidates, n)
            measured = metric(spliced.run(_patches(mask, reference, clean_acts, names))) - clean
            predicted = -(estimate * mask).sum(1)
            points.append(
                AblationPoint(
                    n, measured.tolist(), predicted.tolist(), float(mask.sum(1).double().mean())
                )
            )
        out[name] = points
    return out


# ---------------------------------------------------------------------------- (b) curves
@dataclass
class CurveSet:
    """Every method's faithfulness curve on one batch, with the endpoints it is normalised by."""

    curves: dict[str, CircuitCurve]
    endpoints: dict[str, float]  # clean, corrupt (model), all, none (harness)
    candidates: float  # mean latents that differ between the runs, per prompt
    circuit: str = "live"
    #: per method and budget, the faithfulness its estimates predict: the kept latents'
    #: estimates summed, batch mean, over ``m(all) - m(none)`` (linear in the latents kept)
    predicted: dict[str, list[float]] = field(default_factory=dict)

    def area(self, method: str) -> float:
        return log_area(self.curves[method])


def log_area(curve: CircuitCurve) -> float:
    """Area under faithfulness against ``log(n) / log(N)`` (``N``: the largest budget), so that
    each factor of latents kept weighs the same; budgets start at 1."""
    top = max(curve.budgets)
    if top <= 1:
        return float(curve.faithfulness[-1])
    x = [math.log(k) / math.log(top) for k in curve.budgets]
    return trapezoid_area(x, curve.faithfulness)


@torch.no_grad()
def faithfulness_curves(
    spliced: SplicedModel,
    metric: Metric,
    scores: Mapping[str, Scores],
    corrupted_acts: LatentTensors,
    budgets: Sequence[int] | None = None,
    circuit: Circuit = "live",
    clean_metric: float | None = None,
    corrupt_metric: float | None = None,
) -> CurveSet:
    """(b): per method and ``n``, on the clean prompts keep each prompt's top-``n`` latents (by
    ``|key|``, among those whose activation differs between the runs) and hold every other
    latent at its corrupted activation; errors stay frozen at their clean values.

    ``circuit="live"``: kept latents are computed by their encoders from the patched stream
    (Sparse Feature Circuits' semantics; they carry indirect effects). ``"fixed"``: kept latents
    are held at their clean activations (each acts only through paths that avoid every other
    latent, the graphs' direct shares). Faithfulness ``(m(circuit) - m(none)) / (m(all) -
    m(none))`` of batch means: ``m(all)`` is the clean run (the spliced model reproduces it),
    ``m(none)`` has every latent at its corrupted activation.
    """
    if circuit not in ("live", "fixed"):
        raise DePassInputError(f"circuit must be 'live' or 'fixed', got {circuit!r}")
    names = spliced.names
    clean_acts = {n: r.acts for n, r in spliced.clean.items()}
    candidates = flatten({n: clean_acts[n] != corrupted_acts[n] for n in names}, names)
    everything = torch.ones_like(candidates)
    m_all = float(metric(spliced.run()).mean())
    m_none = float(
        metric(spliced.run(_patches(everything, corrupted_acts, clean_acts, names))).mean()
    )
    if budgets is None:
        budgets = budget_grid(int(candidates.sum(1).max()))
    gap = m_all - m_none
    curves = {}
    predicted: dict[str, list[float]] = {}
    for name, s in scores.items():
        key, estimate = flatten(s.key, names), flatten(s.estimate, names)
        faithfulness, predicted[name] = [], []
        for n in budgets:
            kept = top_n_mask(key, candidates, n)
            total = float((estimate * kept).sum(1).mean())
            predicted[name].append(total / gap if gap != 0 else math.nan)
            if circuit == "live":
                patches = _patches(~kept, corrupted_acts, clean_acts, names)
            else:
                held = unflatten(kept, clean_acts, names)
                fixed = {k: torch.where(held[k], clean_acts[k], corrupted_acts[k]) for k in names}
                patches = _patches(everything, fixed, clean_acts, names)
            m = float(metric(spliced.run(patches)).mean())
            faithfulness.append((m - m_none) / gap if gap != 0 else math.nan)
        curves[name] = CircuitCurve(
            name, int(max(budgets)), list(budgets), faithfulness, [], s.seconds
        )
    endpoints = {"all": m_all, "none": m_none}
    if clean_metric is not None:
        endpoints["clean"] = clean_metric
    if corrupt_metric is not None:
        endpoints["corrupt"] = corrupt_metric
    changed = float(candidates.sum(1).double().mean())
    return CurveSet(curves, endpoints, changed, circuit, predicted)


def best_of(curves: Mapping[str, CircuitCurve], methods: Sequence[str], name: str) -> CircuitCurve:
    """The pointwise best of ``methods``' curves (same budgets) as one curve."""
    first = curves[methods[0]]
    values = [max(curves[m].faithfulness[i] for m in methods) for i in range(len(first.budgets))]
    return CircuitCurve(name, first.n_edges, list(first.budgets), values)


def win_table(
    curve_set: CurveSet, baselines: Sequence[str] = BASELINES, tolerance: float = 1e-3
) -> dict[str, dict[str, Any]]:
    """Per DePass variant, the budgets where it is at least as faithful as every baseline
    (within ``tolerance``) and its largest shortfall (:func:`~.circuit_faithfulness.wins`)."""
    curves = dict(curve_set.curves)
    present = [b for b in baselines if b in curves]
    curves["best baseline"] = best_of(curves, present, "best baseline")
    return {
        m: wins(curves, m, "best baseline", tolerance)
        for m in curve_set.curves
        if m.startswith("depass")
    }


# ---------------------------------------------------------------------------- one model
#: What :func:`evaluate` runs by default (graph methods first, then the gradient baselines).
DEFAULT_METHODS = (
    "depass-value",
    "depass-symmetric",
    "depass-contrast",
    "depass-value-total",
    "depass-symmetric-total",
    "depass-contrast-total",
    "circuit-tracer",
)
ABLATION_BUDGETS = (1, 2, 5, 10, 20, 50)


@dataclass
class FeatureFaithfulness:
    """Both protocols on one model: (a) per reference, per method, one point per ``n``; (b) per
    circuit semantics, every method's curve."""

    name: str
    prompts: int
    sites: list[str]
    seconds: dict[str, float]
    ablation: dict[str, dict[str, list[AblationPoint]]]
    curves: dict[str, CurveSet]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prompts": self.prompts,
            "sites": self.sites,
            "seconds": self.seconds,
            "meta": self.meta,
            "ablation": {
                ref: {m: [p.stats() | asdict(p) for p in pts] for m, pts in by.items()}
                for ref, by in self.ablation.items()
            },
            "curves": {
                circuit: {
                    "endpoints": cs.endpoints,
                    "candidates": cs.candidates,
                    "predicted": cs.predicted,
                    "areas": {m: cs.area(m) for m in cs.curves},
                    "wins": win_table(cs),
                    "wins_0.01": win_table(cs, tolerance=0.01),
                    "curves": {m: c.to_dict() for m, c in cs.curves.items()},
                }
                for circuit, cs in self.curves.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureFaithfulness:
        """Inverse of :meth:`to_dict` (the derived statistics are recomputed)."""
        fields = ("n", "measured", "predicted", "ablated")
        ablation = {
            ref: {m: [AblationPoint(*(p[f] for f in fields)) for p in pts] for m, pts in by.items()}
            for ref, by in data["ablation"].items()
        }
        curves = {}
        for circuit, entry in data["curves"].items():
            kept = ("method", "n_edges", "budgets", "faithfulness", "kept", "seconds")
            by_method = {m: CircuitCurve(*(c[f] for f in kept)) for m, c in entry["curves"].items()}
            curves[circuit] = CurveSet(
                by_method,
                entry["endpoints"],
                entry["candidates"],
                circuit,
                entry.get("predicted", {}),
            )
        return cls(
            data["name"],
            data["prompts"],
            data["sites"],
            data["seconds"],
            ablation,
            curves,
            data.get("meta", {}),
        )


def evaluate(
    model: Any,
    dictionaries: Any,
    tokens: Tensor,
    corrupted: Tensor,
    answers: Tensor,
    wrong: Tensor,
    *,
    name: str = "model",
    methods: Sequence[str] = DEFAULT_METHODS,
    references: Sequence[Reference] = ("zero", "corrupted"),
    circuits: Sequence[Circuit] = ("fixed", "live"),
    ablation_budgets: Sequence[int] = ABLATION_BUDGETS,
    ig_steps: int = IG_STEPS,
    progress: bool = False,
) -> FeatureFaithfulness:
    """Every method of :data:`GRAPH_METHODS` named in ``methods``, attribution patching and
    integrated gradients on ``tokens`` (clean) / ``corrupted``, metric ``logit(answer) -
    logit(wrong)`` at the last position: (a) for each reference, (b) for each circuit
    semantics (module docstring)."""
    metric = logit_diff_metric(answers, wrong)
    spliced = SplicedModel(model, dictionaries, tokens)
    graphs = graph_scores(
        spliced, answers, wrong, [m for m in methods if m in GRAPH_METHODS], corrupted, progress
    )
    ablation: dict[str, dict[str, list[AblationPoint]]] = {}
    seconds: dict[str, float] = {m: g.seconds for m, g in graphs.items()}
    corrupted_acts = reference_acts(spliced, "corrupted", corrupted)
    for ref in references:
        values = corrupted_acts if ref == "corrupted" else reference_acts(spliced, ref)
        scores = method_scores(spliced, metric, graphs, values, ref == "corrupted", ig_steps)
        for m in ("attribution patching", "integrated gradients"):
            seconds[f"{m} ({ref})"] = scores[m].seconds
        ablation[ref] = ablation_agreement(spliced, metric, scores, values, ablation_budgets)
    scores = method_scores(spliced, metric, graphs, corrupted_acts, True, ig_steps)
    with torch.no_grad():
        clean_m = float(metric(spliced.model(tokens)).mean())
        corrupt_m = float(metric(spliced.model(corrupted)).mean())
    curves: dict[str, CurveSet] = {
        c: faithfulness_curves(spliced, metric, scores, corrupted_acts, None, c, clean_m, corrupt_m)
        for c in circuits
    }
    return FeatureFaithfulness(
        name,
        int(tokens.shape[0]),
        spliced.names,
        seconds,
        ablation,
        curves,
        {"ig_steps": ig_steps, "dtype": str(spliced.dtype).removeprefix("torch.")},
    )


# ---------------------------------------------------------------------------- tables
def _cell(value: float, best: float) -> str:
    text = f"{value:.3f}"
    return f"**{text}**" if abs(value - best) < 5e-4 else text


def area_table(results: Sequence[FeatureFaithfulness], circuit: str) -> str:
    """Markdown: area under each method's curve (log budgets), one row per model."""
    methods = list(dict.fromkeys(m for r in results for m in r.curves[circuit].curves))
    lines = [
        "| model | latents per prompt | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in results:
        cs = r.curves[circuit]
        areas = {m: cs.area(m) for m in cs.curves}
        best = max(areas.values())
        cells = [_cell(areas[m], best) if m in areas else "–" for m in methods]
        lines.append(f"| {r.name} | {cs.candidates:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def win_lines(results: Sequence[FeatureFaithfulness], circuit: str) -> str:
    """Markdown: per model and DePass variant, the budgets where it is at least as faithful as
    every baseline, strictly (0.001) and within 0.01, and its largest shortfall."""
    lines = [
        "| model | DePass variant | >= every baseline | within 0.01 | largest shortfall "
        "(at latents) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cs = r.curves[circuit]
        strict, loose = win_table(cs), win_table(cs, tolerance=0.01)
        for m, w in strict.items():
            lines.append(
                f"| {r.name} | {m} | {w['at_least_as_faithful']} of {w['budgets']} "
                f"({100 * w['share']:.0f}%) | {loose[m]['at_least_as_faithful']} of "
                f"{w['budgets']} ({100 * loose[m]['share']:.0f}%) | "
                f"{max(w['worst_gap'], 0.0):.3f} ({w['worst_gap_budget']}) |"
            )
    return "\n".join(lines)


def ablation_table(result: FeatureFaithfulness, reference: str) -> str:
    """Markdown: per method and ``n``, Pearson r (across prompts) between predicted and
    measured change, and the mean absolute error relative to the mean |measured change|."""
    by = result.ablation[reference]
    ns = [p.n for p in next(iter(by.values()))]
    lines = [
        "| method | " + " | ".join(f"n={n}: r / rel. err" for n in ns) + " | mean r |",
        "|---|" + "---|" * (len(ns) + 1),
    ]
    stats = {m: [p.stats() for p in pts] for m, pts in by.items()}
    mean_r = {m: float(np.nanmean([s["pearson"] for s in st])) for m, st in stats.items()}
    for m, st in stats.items():
        cells = [f"{s['pearson']:.2f} / {s['relative_error']:.2f}" for s in st]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean_r[m]:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- issue 11's table
#: Feature-graph rows added to the single-latent table: name -> (graph method, with the MLP
#: transcoders after the SAE spliced in as well).
SINGLE_LATENT_GRAPHS: dict[str, tuple[str, bool]] = {
    "feature graph (value)": ("depass-value", False),
    "feature graph (symmetric)": ("depass-symmetric", False),
    "feature graph total (symmetric, later MLPs' transcoders)": ("depass-symmetric-total", True),
}


def single_latent_table(
    model: Any,
    sae: Any,
    tokens: Tensor,
    answers: Tensor,
    wrong: Tensor,
    transcoders: Sequence[Any] = (),
    **kwargs: Any,
) -> FaithfulnessResult:
    """Issue 11's single-latent table (:func:`~.sae_faithfulness.sae_faithfulness`: every active
    latent of one SAE zero-ablated alone, exactly) with feature-graph rows added: the graph's
    share of each latent (summed over positions; one graph per prompt), and its total share with
    the ``transcoders`` of the MLPs after the SAE as further dictionaries (the MLPs' response
    then follows their latents, which the SAE latent's total includes)."""
    result = sae_faithfulness(model, sae, tokens, answers, wrong, **kwargs)
    s = setup(model, sae, tokens)
    metric = sae_logit_diff(answers, wrong)
    effect = ablation_effects(s, metric)
    later = [
        t for t in transcoders if int(as_sae_view(t).hook_out.split(".")[1]) > s.placement.layer
    ]
    removal_ks = kwargs.get("removal_ks", (1, 3, 5, 10))
    oracle = [k for k in result.removal if "oracle" in k]
    for row, (method, with_mlps) in SINGLE_LATENT_GRAPHS.items():
        if with_mlps and not later:
            continue
        spliced = SplicedModel(model, [sae, *later] if with_mlps else [sae], tokens)
        site = next(x.name for x in spliced.sites if x.hook_out == s.view.hook_out)
        g = graph_scores(spliced, answers, wrong, [method])[method]
        share = g.shares[site].sum(1)[:, s.latents]  # [batch, n] in the table's latent order
        predicted = -share
        result.seconds[row] = g.seconds
        result.rows[row] = compare(predicted, effect, s.active, result.ks)
        result.removal[row] = removal_drop(s, metric, predicted, removal_ks)
    for k in oracle:  # the oracle stays the last row
        result.removal[k] = result.removal.pop(k)
    return result
