"""Target metrics: what an attribution explains, as a function of the model's logits.

A :data:`Metric` maps logits ``[batch pos d_vocab]`` to one number per prompt. The constructors
here return :class:`AnswerMetric` objects, which also know *where* they read (so protocols can
evaluate them from the final-position logits only, and after tokens were dropped). Positions
count real tokens like the engine's targets: ``pos=-1`` is the last non-pad token when an
attention mask is given, ``pos=0`` the first real one (left padding shifts it).

Any other callable works too; protocols then read it at the last real token and call it on a
length-1 position axis (``logits[:, [p]]``), so it must read position ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, " batch"]]
MetricKind = Literal["logit", "logit_diff", "prob"]


def real_positions(
    pos: int | Int[Tensor, " batch"],
    shape: tuple[int, int],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Int[Tensor, " batch"]:
    """Absolute indices of a per-prompt position counted among real (non-pad) tokens."""
    batch, n_pos = shape
    device = attention_mask.device if attention_mask is not None else None
    if attention_mask is None:
        mask = torch.ones(batch, n_pos, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.bool()
    lengths = mask.sum(-1)
    first = mask.float().argmax(-1)
    requested = torch.as_tensor(pos, device=mask.device).long().flatten().expand(batch)
    if ((requested >= lengths) | (requested < -lengths)).any():
        raise ValueError(f"position {pos} is out of range for prompts of {lengths.tolist()} tokens")
    return first + torch.where(requested < 0, requested + lengths, requested)


def _per_prompt(ids: int | Tensor, batch: int | None = None) -> Tensor:
    ids = torch.as_tensor(ids).long()
    return ids.expand(batch) if batch is not None and ids.ndim == 0 else ids


@dataclass(frozen=True, eq=False)
class AnswerMetric:
    """Logit, logit difference or probability of an answer token at one position per prompt."""

    kind: MetricKind
    answer_ids: Int[Tensor, " batch"] | int
    wrong_ids: Int[Tensor, " batch"] | int | None = None
    pos: int | Int[Tensor, " batch"] = -1
    attention_mask: Int[Tensor, "batch pos"] | None = None

    def with_mask(self, attention_mask: Tensor | None) -> AnswerMetric:
        """The same metric with ``pos`` counted among the real tokens of ``attention_mask``."""
        if attention_mask is None or self.attention_mask is not None:
            return self
        return replace(self, attention_mask=attention_mask)

    def positions(self, batch: int, n_pos: int) -> Int[Tensor, " batch"]:
        """Absolute index of the position read in each prompt."""
        return real_positions(self.pos, (batch, n_pos), self.attention_mask)

    def read(self, final: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        """The metric from the logits at the read position (one row per prompt)."""
        rows = torch.arange(final.shape[0], device=final.device)
        answers = _per_prompt(self.answer_ids, final.shape[0]).to(final.device)
        if self.kind == "prob":
            return final.softmax(-1)[rows, answers]
        value = final[rows, answers]
        if self.kind == "logit_diff":
            assert self.wrong_ids is not None
            value = (
                value - final[rows, _per_prompt(self.wrong_ids, final.shape[0]).to(final.device)]
            )
        return value

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        positions = self.positions(logits.shape[0], logits.shape[1]).to(logits.device)
        return self.read(logits[rows, positions])


def logit_metric(
    answer_ids: Int[Tensor, " batch"] | int,
    pos: int | Int[Tensor, " batch"] = -1,
    *,
    attention_mask: Tensor | None = None,
) -> AnswerMetric:
    """Logit of ``answer_ids`` (one per prompt, or one for all) at ``pos``."""
    return AnswerMetric("logit", answer_ids, None, pos, attention_mask)


def logit_diff_metric(
    answer_ids: Int[Tensor, " batch"] | int,
    wrong_ids: Int[Tensor, " batch"] | int,
    pos: int | Int[Tensor, " batch"] = -1,
    *,
    attention_mask: Tensor | None = None,
) -> AnswerMetric:
    """``logit(answer) - logit(wrong)`` at ``pos``: the usual circuit-discovery metric."""
    return AnswerMetric("logit_diff", answer_ids, wrong_ids, pos, attention_mask)


def prob_metric(
    answer_ids: Int[Tensor, " batch"] | int,
    pos: int | Int[Tensor, " batch"] = -1,
    *,
    attention_mask: Tensor | None = None,
) -> AnswerMetric:
    """Softmax probability of ``answer_ids`` at ``pos``."""
    return AnswerMetric("prob", answer_ids, None, pos, attention_mask)


# ------------------------------------------------------------------ helpers for the protocols
def bind_mask(metric: Metric, attention_mask: Tensor | None) -> Metric:
    """Give an :class:`AnswerMetric` without a mask the call's mask (so ``-1`` skips pads)."""
    return metric.with_mask(attention_mask) if isinstance(metric, AnswerMetric) else metric


def metric_positions(
    metric: Metric | None,
    shape: tuple[int, int],
    attention_mask: Tensor | None = None,
) -> Int[Tensor, " batch"]:
    """Where ``metric`` reads: its own positions, else the last real token of each prompt."""
    if isinstance(metric, AnswerMetric):
        return metric.with_mask(attention_mask).positions(*shape)
    return real_positions(-1, shape, attention_mask)


def metric_at(metric: Metric, final: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
    """Evaluate ``metric`` from the logits at its read position only."""
    if isinstance(metric, AnswerMetric):
        return metric.read(final)
    return metric(final.unsqueeze(1))


def real_mask(
    tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None
) -> Bool[Tensor, "batch pos"]:
    """True at real (non-pad) tokens."""
    if attention_mask is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    return attention_mask.to(tokens.device).bool()
