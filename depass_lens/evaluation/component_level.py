"""Component-level faithfulness: ablate the top-k (or bottom-k) components of a ranking.

Ablating the components a faithful method ranks *top* should destroy the task (metric,
accuracy, answer probability drop fast: low area); ablating its *bottom* ones should leave it
intact (high area). Components are heads, all neurons, or one layer's neurons (see ``levels``),
ablated by zero or by their mean over a reference set.

Ranking: components are shared by all prompts, so by default they are ranked by the *batch-mean*
score (``rank="mean"``) and the same ``k`` components are ablated in every prompt;
``rank="per_example"`` ranks and ablates per prompt. Pass importance-oriented scores (high = the
component supports the metric; ``registry.component_sign`` turns change effects into that).

Accuracy: logit difference ``> 0`` when wrong answers are known (from ``wrong_ids`` or a
logit-difference metric), else "the answer is still the argmax". The answer is ``answer_ids``,
else the metric's answer, else the clean argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.curves import DEFAULT_GRID, Curve
from depass_lens.evaluation.forward import final_logits, tile
from depass_lens.evaluation.levels import (
    Level,
    ablation_fills,
    ablation_hooks,
    ranked_mask,
    resolve_level,
)
from depass_lens.evaluation.metrics import (
    AnswerMetric,
    Metric,
    bind_mask,
    metric_at,
    metric_positions,
)


def _per_prompt(ids: Tensor | int | None, batch: int) -> Tensor | None:
    if ids is None:
        return None
    ids = torch.as_tensor(ids).long()
    return ids.expand(batch) if ids.ndim == 0 else ids


def default_ks(n_comp: int, grid: Sequence[float] = DEFAULT_GRID) -> list[int]:
    """Component counts for a grid of fractions (rounded, deduplicated, sorted)."""
    return sorted({int(round(f * n_comp)) for f in grid})


def component_order(
    scores: Float[Tensor, "*batch n_comp"],
    batch: int,
    *,
    which: Literal["top", "bottom"] = "top",
    rank: Literal["mean", "per_example"] = "mean",
) -> Int[Tensor, "batch n_comp"]:
    """Components from first- to last-ablated, one row per prompt (ties: lower index first)."""
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', not {which!r}")
    scores = scores.detach().double()
    if rank == "mean":
        key = scores.mean(0) if scores.ndim == 2 else scores
        order = key.argsort(descending=which == "top", stable=True)
        return order.expand(batch, -1)
    if rank == "per_example":
        if scores.ndim != 2 or len(scores) != batch:
            raise ValueError("per-example ranking needs scores of shape [batch, n_comp]")
        return scores.argsort(dim=-1, descending=which == "top", stable=True)
    raise ValueError(f"rank must be 'mean' or 'per_example', not {rank!r}")


@torch.no_grad()
def component_masking_curve(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "*batch n_comp"],
    metric: Metric,
    *,
    level: Level,
    which: Literal["top", "bottom"] = "top",
    ablation: Literal["zero", "mean"] = "mean",
    ks: Sequence[int] | None = None,
    reference_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    answer_ids: Tensor | None = None,
    wrong_ids: Tensor | None = None,
    rank: Literal["mean", "per_example"] = "mean",
    mean_over: Literal["all", "batch"] = "all",
    batch_size: int = 256,
) -> Curve:
    """Metric, accuracy and answer probability with the ``k`` top/bottom components ablated.

    The grid is ``k / n_comp``; ``ks`` defaults to 0%, 10%, ..., 100% of the components.
    ``batch_size`` caps the rows of one forward pass (several ``k`` run together).
    """
    spec = resolve_level(model, level)
    if scores.shape[-1] != spec.n_comp:
        raise ValueError(f"{scores.shape[-1]} scores for {spec.n_comp} components of {level!r}")
    batch = len(tokens)
    metric = bind_mask(metric, attention_mask)
    if isinstance(metric, AnswerMetric):
        answer_ids = metric.answer_ids if answer_ids is None else answer_ids  # type: ignore[assignment]
        if metric.kind == "logit_diff" and wrong_ids is None:
            wrong_ids = metric.wrong_ids  # type: ignore[assignment]
    positions = metric_positions(metric, tuple(tokens.shape), attention_mask)  # type: ignore[arg-type]
    clean = final_logits(model, tokens, positions, attention_mask=attention_mask)
    answers = _per_prompt(answer_ids, batch)
    answers = clean.argmax(-1) if answers is None else answers.to(clean.device)
    wrong = _per_prompt(wrong_ids, batch)
    fills = ablation_fills(
        model,
        spec,
        ablation,
        tokens=tokens,
        attention_mask=attention_mask,
        reference_tokens=reference_tokens,
        mean_over=mean_over,
    )
    order = component_order(scores, batch, which=which, rank=rank)
    ks = default_ks(spec.n_comp) if ks is None else list(ks)
    clean_metric = float(metric_at(metric, clean).mean())
    curve = Curve(
        f"{which}-k {ablation}-ablation",
        [k / spec.n_comp for k in ks],
        {"metric": [], "metric_fraction": [], "accuracy": [], "prob": []},
        {
            "level": spec.kind if len(spec.layers) > 1 else f"neurons of layer {spec.layers[0]}",
            "n_comp": spec.n_comp,
            "ks": ks,
            "which": which,
            "ablation": ablation,
            "rank": rank,
            "clean_metric": clean_metric,
            "accuracy": "logit diff > 0" if wrong is not None else "answer is the argmax",
        },
    )
    per_pass = max(1, batch_size // batch)
    for start in range(0, len(ks), per_pass):  # several k per forward pass, one per replica
        chunk = ks[start : start + per_pass]
        counts = einops.repeat(torch.tensor(chunk), "m -> (m b)", b=batch)
        mask = ranked_mask(order.repeat(len(chunk), 1), counts)
        hooks = ablation_hooks(spec, mask, None if fills is None else fills.repeat(len(chunk)))
        final = final_logits(
            model, tile(tokens, len(chunk)), tile(positions, len(chunk)), fwd_hooks=hooks,  # type: ignore[arg-type]
            attention_mask=tile(attention_mask, len(chunk)),
        )  # fmt: skip
        for logits in final.split(batch):
            _record(curve, metric, logits, answers, wrong, clean_metric)
    return curve


def _record(
    curve: Curve,
    metric: Metric,
    logits: Float[Tensor, "batch d_vocab"],
    answers: Tensor,
    wrong: Tensor | None,
    clean_metric: float,
) -> None:
    rows = torch.arange(len(logits), device=logits.device)
    value = float(metric_at(metric, logits).mean())
    if wrong is not None:
        correct = logits[rows, answers] > logits[rows, wrong.to(logits.device)]
    else:
        correct = logits.argmax(-1) == answers
    curve.values["metric"].append(value)
    curve.values["metric_fraction"].append(value / clean_metric if clean_metric else value)
    curve.values["accuracy"].append(float(correct.double().mean()))
    curve.values["prob"].append(float(logits.softmax(-1)[rows, answers].mean()))


def component_curves(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "*batch n_comp"],
    metric: Metric,
    *,
    level: Level,
    ablations: Sequence[str] = ("zero", "mean"),
    **options,
) -> dict[str, Curve]:
    """Top-k and bottom-k curves for each ablation, keyed like ``"top-k mean-ablation"``."""
    curves = {}
    for ablation in ablations:
        for which in ("top", "bottom"):
            curve = component_masking_curve(
                model,
                tokens,
                scores,
                metric,
                level=level,
                which=which,
                ablation=ablation,  # type: ignore[arg-type]
                **options,
            )
            curves[curve.name] = curve
    return curves
