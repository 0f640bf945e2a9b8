"""Agreement with a ground truth (exhaustive ablation): rank correlation and top-k overlap.

Per-example scores ``[batch n]`` are compared by their batch mean (components are shared by all
prompts); ``per_example=True`` in :func:`agreement` averages the per-prompt statistics instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

By = Literal["abs", "signed"]


def rankdata(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks from 1 (smallest) to n; tied values share the average of their ranks."""
    x = x.detach().flatten().double()
    sorted_x, order = x.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # rank of the last member of each tie group
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks).

    NaN when either input is constant (no ranking to compare), as in scipy.
    """
    if a.numel() != b.numel():
        raise ValueError(f"spearman of {a.numel()} and {b.numel()} values")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denom if denom > 0 else float("nan")


def top_k(scores: Float[Tensor, " n"], k: int, by: By = "abs") -> list[int]:
    """Indices of the ``k`` largest scores (by magnitude or signed value; ties: lowest index)."""
    if by not in ("abs", "signed"):
        raise ValueError(f"by must be 'abs' or 'signed', not {by!r}")
    key = scores.detach().flatten().double()
    key = key.abs() if by == "abs" else key
    return key.argsort(descending=True, stable=True)[:k].tolist()


def precision_at_k(
    scores: Float[Tensor, " n"], truth: Float[Tensor, " n"], k: int, *, by: By = "abs"
) -> float:
    """``|top_k(scores) & top_k(truth)| / k``.

    ``by="abs"`` ranks by magnitude (orientation-free: a change effect and a share can be
    compared); ``by="signed"`` ranks by value (both must be oriented alike, e.g. importance).
    """
    if not 0 < k <= scores.numel():
        raise ValueError(f"k={k} must be in 1..{scores.numel()}")
    return len(set(top_k(scores, k, by)) & set(top_k(truth, k, by))) / k


def agreement(
    scores: Float[Tensor, "*batch n"],
    truth: Float[Tensor, "*batch n"],
    *,
    ks: Sequence[int] = (),
    by: By = "abs",
    per_example: bool = False,
) -> dict[str, float]:
    """Spearman and precision@k of ``scores`` against ``truth``.

    2-D inputs are reduced to their batch mean first, unless ``per_example`` (then the statistics
    are computed per row and averaged; both must be ``[batch n]``).
    """
    scores, truth = scores.detach().double(), truth.detach().double()
    if per_example and scores.ndim == 2 and truth.ndim == 2:
        rows = [agreement(s, t, ks=ks, by=by) for s, t in zip(scores, truth)]
        return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
    if scores.ndim == 2:
        scores = scores.mean(0)
    if truth.ndim == 2:
        truth = truth.mean(0)
    out = {"spearman": spearman(scores, truth), "spearman_abs": spearman(scores.abs(), truth.abs())}
    for k in ks:
        if 0 < k <= scores.numel():
            out[f"precision@{k}"] = precision_at_k(scores, truth, k, by=by)
    return out


def baseline_relative(
    scores_fn: Callable[[Tensor], Float[Tensor, "batch n"]],
    tokens: Float[Tensor, "batch pos"],
    reference_tokens: Float[Tensor, "ref pos"],
    *,
    paired: bool = False,
) -> Float[Tensor, "batch n"]:
    """``scores_fn(tokens)`` minus each component's mean score on ``reference_tokens``.

    Why: a decomposition (DePass) scores a component by its *share of the full value* of the
    metric, while ablation and patching measure the *change* of the metric when the component is
    removed or swapped for a reference value. A component that writes the same thing on every
    prompt (a constant offset) gets a large share but no change. Subtracting its share on a
    reference set (corrupted prompts, or the dataset) turns the share into a change relative to
    that reference, so the two can be compared like with like (up to sign: a share-minus-reference
    approximates ``metric(clean) - metric(patched)``, the negative of a patching effect).

    ``paired``: subtract row by row (``reference_tokens[i]`` is the counterfactual of prompt
    ``i``) instead of the reference mean.
    """
    scores = scores_fn(tokens)
    reference = scores_fn(reference_tokens)
    if paired:
        if reference.shape != scores.shape:
            raise ValueError("paired baseline needs one reference prompt per prompt")
        return scores - reference
    return scores - reference.mean(0, keepdim=True)
