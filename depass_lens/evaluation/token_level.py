"""Token-level faithfulness: Disrupt-top and Recover-top (DePass paper, Sec. token attribution).

Disrupt-top masks the top-k% attributed input tokens: a faithful ranking makes the model's
*original* answer (its clean argmax at the metric's position, or ``answer_ids``) lose the most
probability and logit, so lower curves and areas are better. Recover-top keeps only the top-k%
tokens and masks the rest: a faithful ranking keeps the answer best, so higher is better.

Per ``k`` the curves hold the mean probability and logit of the original answer, the accuracy
(original answer still the argmax) and, when a metric is given, its mean. Scores rank tokens
within each prompt (by signed value, or ``by="abs"``); see ``token_masking`` for what is masked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.curves import DEFAULT_GRID, Curve
from depass_lens.evaluation.forward import final_logits, tile
from depass_lens.evaluation.metrics import Metric, bind_mask, metric_at, metric_positions
from depass_lens.evaluation.token_masking import (
    Masking,
    mask_tokens,
    maskable_positions,
    masking_defaults,
    top_fraction,
)

Mode = Literal["disrupt", "recover"]


def masked_final_logits(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    masks: Sequence[Bool[Tensor, "batch pos"]],
    positions: Int[Tensor, " batch"],
    *,
    masking: Masking,
    fill_id: int,
    attention_mask: Tensor | None = None,
    batch_size: int = 256,
) -> Iterator[Float[Tensor, "batch d_vocab"]]:
    """Final logits for each mask in ``masks`` (several masks per forward pass unless dropping)."""
    per_pass = 1 if masking == "drop" else max(1, batch_size // len(tokens))
    for start in range(0, len(masks), per_pass):
        chunk = masks[start : start + per_pass]
        times = len(chunk)
        run = mask_tokens(
            tile(tokens, times), torch.cat(list(chunk)), masking=masking, fill_id=fill_id,  # type: ignore[arg-type]
            attention_mask=tile(attention_mask, times),
        )  # fmt: skip
        mapped = run.map_positions(tile(positions, times))  # type: ignore[arg-type]
        final = final_logits(model, run.tokens, mapped, fwd_hooks=run.hooks(), **run.kwargs())
        yield from final.split(len(tokens))


@torch.no_grad()
def token_masking_curve(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    *,
    mode: Mode = "disrupt",
    metric: Metric | None = None,
    attention_mask: Tensor | None = None,
    masking: Masking = "replace",
    fill_id: int | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    protect_bos: bool | None = None,
    protect_query: bool = True,
    by: Literal["signed", "abs"] = "signed",
    answer_ids: Int[Tensor, " batch"] | None = None,
    batch_size: int = 256,
) -> Curve:
    """Disrupt-top (``mode="disrupt"``) or Recover-top (``"recover"``) over ``grid``.

    ``batch_size`` caps the rows of one forward pass (several grid points run together).
    """
    if mode not in ("disrupt", "recover"):
        raise ValueError(f"mode must be 'disrupt' or 'recover', not {mode!r}")
    if scores.shape != tokens.shape:
        raise ValueError(f"scores {tuple(scores.shape)} do not match tokens {tuple(tokens.shape)}")
    metric = None if metric is None else bind_mask(metric, attention_mask)
    fill_id, protect_bos = masking_defaults(model, fill_id, protect_bos)
    positions = metric_positions(metric, tuple(tokens.shape), attention_mask)  # type: ignore[arg-type]
    clean = final_logits(model, tokens, positions, attention_mask=attention_mask)
    answers = clean.argmax(-1) if answer_ids is None else answer_ids.to(clean.device)
    rows = torch.arange(len(tokens), device=clean.device)
    maskable = maskable_positions(
        tokens, attention_mask, positions, protect_bos=protect_bos, protect_query=protect_query
    )
    keys = ["prob", "logit", "accuracy"] + (["metric"] if metric is not None else [])
    curve = Curve(
        f"{mode}-top",
        [float(f) for f in grid],
        {key: [] for key in keys},
        {
            "mode": mode,
            "masking": masking,
            "fill_id": fill_id if masking != "zero" else None,
            "protect_bos": protect_bos,
            "protect_query": protect_query,
            "by": by,
            "mean_maskable_tokens": float(maskable.sum(-1).double().mean()),
            "answer": "given answer_ids" if answer_ids is not None else "clean argmax",
        },
    )
    masks = []
    for fraction in grid:
        top = top_fraction(scores, maskable, fraction, by)
        masks.append(top if mode == "disrupt" else maskable & ~top)
    for logits in masked_final_logits(
        model, tokens, masks, positions, masking=masking, fill_id=fill_id,
        attention_mask=attention_mask, batch_size=batch_size,
    ):  # fmt: skip
        curve.values["prob"].append(float(logits.softmax(-1)[rows, answers].mean()))
        curve.values["logit"].append(float(logits[rows, answers].mean()))
        curve.values["accuracy"].append(float((logits.argmax(-1) == answers).double().mean()))
        if metric is not None:
            curve.values["metric"].append(float(metric_at(metric, logits).mean()))
    curve.info["clean_prob"] = float(clean.softmax(-1)[rows, answers].mean())
    if metric is not None:
        curve.info["clean_metric"] = float(metric_at(metric, clean).mean())
    return curve


def disrupt_top(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    **options,
) -> Curve:
    """Mask the top-k% tokens; lower curves (faster loss of the answer) are more faithful."""
    return token_masking_curve(model, tokens, scores, mode="disrupt", **options)


def recover_top(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    **options,
) -> Curve:
    """Keep only the top-k% tokens; higher curves (answer kept with fewer tokens) are better."""
    return token_masking_curve(model, tokens, scores, mode="recover", **options)


def token_curves(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    **options,
) -> dict[str, Curve]:
    """Both protocols: ``{"disrupt": Curve, "recover": Curve}``."""
    return {
        mode: token_masking_curve(model, tokens, scores, mode=mode, **options)  # type: ignore[arg-type]
        for mode in ("disrupt", "recover")
    }
