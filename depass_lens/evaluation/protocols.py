"""The faithfulness protocols: mask what a method ranks highest (or lowest) and watch the model.

Token level (Disrupt-top / Recover-top): mask the top-k% attributed input tokens (or keep only
them) and track the probability and logit of the model's original answer. Component level: ablate
the top-k (or bottom-k) components and track the task metric, accuracy and answer probability.
Subspace -> input: mask the tokens ranked highest and track a probe's reading.

Rankings use each method's per-prompt scores for tokens (tokens differ between prompts) and the
batch-mean score for components (components are shared by all prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from depass_lens.evaluation.metrics import TaskBatch, trapezoid_area

GRID = tuple(i / 10 for i in range(11))


@dataclass
class Curve:
    """Metric values along a masking grid (fractions), with the area under each."""

    grid: list[float]
    values: dict[str, list[float]] = field(default_factory=dict)

    def area(self, name: str) -> float:
        return trapezoid_area(self.grid, self.values[name])

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "values": self.values,
            "areas": {k: self.area(k) for k in self.values},
        }


# ---------------------------------------------------------------------------------- tokens
def _maskable(tokens: Tensor, protect_bos: bool) -> Tensor:
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if protect_bos:
        keep[:, 0] = False
    return keep


def _masked_logits(
    model: HookedTransformer, tokens: Tensor, masked: Tensor, method: str, fill_id: int
) -> Float[Tensor, "batch vocab"]:
    """Last-position logits with the ``masked`` positions replaced, zeroed, or dropped."""
    if method == "replace":
        return model(torch.where(masked, torch.full_like(tokens, fill_id), tokens))[:, -1]
    if method == "zero":

        def zero(value, hook):
            return value * (~masked).unsqueeze(-1).to(value.dtype)

        return model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", zero)])[:, -1]
    if method == "drop":  # each prompt on its own, without the dropped tokens
        return torch.stack([model(row[~m].unsqueeze(0))[0, -1] for row, m in zip(tokens, masked)])
    raise ValueError(f"masking method must be 'replace', 'zero' or 'drop', not {method!r}")


@torch.no_grad()
def token_curves(
    model: HookedTransformer,
    batch: TaskBatch,
    scores: Float[Tensor, "batch pos"],
    *,
    mode: str = "disrupt",
    masking: str = "replace",
    fill_id: int | None = None,
    grid: Sequence[float] = GRID,
    protect_bos: bool = True,
) -> Curve:
    """Disrupt-top (mask the top-k%) or Recover-top (keep only the top-k%) curves.

    Tracks the probability and logit of the model's *original* answer (its clean argmax) and
    whether it is still the argmax. The last position is the query and is never masked.
    """
    if fill_id is None:
        fill_id = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    tokens = batch.tokens
    clean = model(tokens)[:, -1]
    original = clean.argmax(-1)
    rows = torch.arange(len(tokens))
    maskable = _maskable(tokens, protect_bos)
    maskable[:, -1] = False
    ranked = torch.where(maskable, scores.float(), torch.tensor(-torch.inf)).argsort(
        -1, descending=True
    )
    n_maskable = maskable.sum(-1)
    curve = Curve(list(grid), {"prob": [], "logit": [], "kept": []})
    for fraction in grid:
        count = torch.round(fraction * n_maskable).long()
        top = torch.zeros_like(maskable)
        for b in range(len(tokens)):
            top[b, ranked[b, : count[b]]] = True
        masked = top if mode == "disrupt" else (maskable & ~top)
        if mode not in ("disrupt", "recover"):
            raise ValueError(f"mode must be 'disrupt' or 'recover', not {mode!r}")
        logits = _masked_logits(model, tokens, masked, masking, fill_id)
        curve.values["prob"].append(float(logits.softmax(-1)[rows, original].mean()))
        curve.values["logit"].append(float(logits[rows, original].mean()))
        curve.values["kept"].append(float((logits.argmax(-1) == original).float().mean()))
    return curve


# ---------------------------------------------------------------------------------- components
def _component_hooks(
    model: HookedTransformer, level: str, chosen: Sequence[int], kind: str, means: dict[str, Tensor]
):
    suffix = "attn.hook_z" if level == "heads" else "mlp.hook_post"
    width = model.cfg.n_heads if level == "heads" else (model.cfg.d_mlp or 0)
    by_layer: dict[int, list[int]] = {}
    for comp in chosen:
        by_layer.setdefault(comp // width, []).append(comp % width)
    hooks = []
    for layer, index in by_layer.items():
        name = f"blocks.{layer}.{suffix}"

        def hook(value, hook, index=index, name=name):
            value = value.clone()
            value[:, :, index] = 0 if kind == "zero" else means[name][index]
            return value

        hooks.append((name, hook))
    return hooks


@torch.no_grad()
def component_curves(
    model: HookedTransformer,
    batch: TaskBatch,
    scores: Float[Tensor, "batch comp"],
    level: str,
    *,
    which: str = "top",
    kind: str = "mean",
    ks: Sequence[int] | None = None,
) -> Curve:
    """Ablate the ``k`` highest (``which="top"``) or lowest (``"bottom"``) scored components.

    Tracks the task metric (normalised by its clean value), accuracy (answer is the argmax) and the
    answer's probability. The grid is ``k / n_comp``.
    """
    suffix = "attn.hook_z" if level == "heads" else "mlp.hook_post"
    reference = batch.reference if batch.reference is not None else batch.tokens
    _, cache = model.run_with_cache(reference, names_filter=lambda n: n.endswith(suffix))
    means = {n: cache[n].mean((0, 1)) for n in cache.keys()}
    order = scores.mean(0).argsort(descending=(which == "top")).tolist()
    n_comp = len(order)
    if ks is None:
        ks = sorted({round(f * n_comp) for f in GRID})
    clean_metric = float(batch.metric(model(batch.tokens)).mean())
    rows = torch.arange(len(batch))
    curve = Curve([k / n_comp for k in ks], {"metric": [], "accuracy": [], "prob": []})
    for k in ks:
        hooks = _component_hooks(model, level, order[:k], kind, means)
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)[:, -1]
        metric = float(batch.metric(logits.unsqueeze(1)).mean())
        curve.values["metric"].append(metric / clean_metric if clean_metric else metric)
        curve.values["accuracy"].append(float((logits.argmax(-1) == batch.answers).float().mean()))
        curve.values["prob"].append(float(logits.softmax(-1)[rows, batch.answers].mean()))
    return curve


# ---------------------------------------------------------------------------------- subspace
@torch.no_grad()
def probe_curves(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    hook: str,
    *,
    fill_id: int | None = None,
    grid: Sequence[float] = GRID,
) -> Curve:
    """Mask the top-ranked tokens and track the probe's reading ``<direction, state[-1]>``.

    Reported as the mean absolute change of the reading relative to its clean value: a ranking
    that finds the tokens writing into the probe's subspace changes it most.
    """
    if fill_id is None:
        fill_id = model.tokenizer.pad_token_id if model.tokenizer is not None else 0

    def reading(toks: Tensor) -> Tensor:
        _, cache = model.run_with_cache(toks, names_filter=hook)
        return cache[hook][:, -1] @ direction.to(cache[hook].dtype)

    clean = reading(tokens)
    maskable = _maskable(tokens, True)
    maskable[:, -1] = False
    ranked = torch.where(maskable, scores.float().abs(), torch.tensor(-1.0)).argsort(
        -1, descending=True
    )
    n_maskable = maskable.sum(-1)
    curve = Curve(list(grid), {"change": []})
    for fraction in grid:
        count = torch.round(fraction * n_maskable).long()
        masked = torch.zeros_like(maskable)
        for b in range(len(tokens)):
            masked[b, ranked[b, : count[b]]] = True
        now = reading(torch.where(masked, torch.full_like(tokens, fill_id), tokens))
        curve.values["change"].append(
            float(((now - clean).abs() / clean.abs().clamp_min(1e-6)).mean())
        )
    return curve
