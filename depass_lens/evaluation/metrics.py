"""Task batches, target metrics and the statistics the protocols report (areas, rank agreement)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

import depass_lens as dp


@dataclass
class TaskBatch:
    """Prompts of equal length (answer read at the last position), with what to explain.

    ``wrong`` makes the target a logit difference ``answer - wrong`` (else the answer's logit);
    ``corrupted`` prompts feed attribution patching and baseline-relative scores; ``reference``
    prompts give the means for mean-ablation (default: the batch itself).
    """

    tokens: Int[Tensor, "batch pos"]
    answers: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"] | None = None
    corrupted: Int[Tensor, "batch pos"] | None = None
    reference: Int[Tensor, "ref pos"] | None = None

    @classmethod
    def from_zoo(cls, batch: Any, reference: Any = None) -> TaskBatch:
        """From a ``depass_lens.zoo`` batch (and optionally a reference batch)."""
        return cls(
            batch.tokens,
            batch.answers,
            batch.wrong,
            batch.corrupted,
            None if reference is None else reference.tokens,
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def target(self) -> dp.Target:
        """The DePass target: logit difference (or logit) at each prompt's last position."""
        if self.wrong is not None:
            return dp.LogitDiff(self.answers, self.wrong)
        return dp.Logit(self.answers)

    def metric(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """The same quantity from real logits, per prompt."""
        last = logits[:, -1]
        rows = torch.arange(len(self.answers), device=last.device)
        value = last[rows, self.answers]
        if self.wrong is not None:
            value = value - last[rows, self.wrong]
        return value


def trapezoid_area(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under a curve by the trapezoid rule (``x`` in [0, 1] for the protocols)."""
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def _ranks(x: Tensor) -> Tensor:
    """Ranks starting at 1, ties sharing their average rank."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation (ties averaged), without scipy."""
    ra, rb = _ranks(a.flatten().double()), _ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def precision_at_k(
    scores: Float[Tensor, " n"], truth: Float[Tensor, " n"], k: int, by: str = "signed"
) -> float:
    """``|top_k(scores) ∩ top_k(truth)| / k``; ``by="abs"`` ranks by magnitude instead of value."""
    if by not in ("signed", "abs"):
        raise ValueError(f"by must be 'signed' or 'abs', not {by!r}")
    key = (lambda t: t.abs()) if by == "abs" else (lambda t: t)
    top_s = set(key(scores.flatten()).topk(k).indices.tolist())
    top_t = set(key(truth.flatten()).topk(k).indices.tolist())
    return len(top_s & top_t) / k
