"""Masking input tokens three ways, and choosing which tokens a ranking masks.

``replace``: the token id becomes ``fill_id`` (pad/unk). ``zero``: the token embedding
(``hook_embed``) becomes 0; the position embedding stays. ``drop``: the tokens are removed and
the shorter prompt is re-run (right-padded with an attention mask when lengths differ); the
metric then reads the same token it read before (or, if that one was dropped, the last kept
token before it).

Never masked: pad positions, BOS (the first real token) when ``protect_bos`` (default: when the
model prepends BOS), and the metric's read position (the query) when ``protect_query`` (default:
masking it would change the question asked rather than remove evidence for the answer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.metrics import real_mask

Masking = Literal["replace", "zero", "drop"]


def default_fill_id(model: TLModel) -> int:
    """The tokenizer's pad id, else its unk id, else 0."""
    tokenizer = model.tokenizer
    for attr in ("pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return 0


def masking_defaults(
    model: TLModel, fill_id: int | None, protect_bos: bool | None
) -> tuple[int, bool]:
    """``fill_id`` (default: :func:`default_fill_id`) and ``protect_bos`` (default: whether the
    model prepends BOS), as every masking protocol resolves them."""
    fill_id = default_fill_id(model) if fill_id is None else fill_id
    protect_bos = make_adapter(model).default_prepend_bos if protect_bos is None else protect_bos
    return fill_id, protect_bos


def maskable_positions(
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    query: Int[Tensor, " batch"],
    *,
    protect_bos: bool,
    protect_query: bool = True,
) -> Bool[Tensor, "batch pos"]:
    """Real positions a protocol may mask."""
    maskable = real_mask(tokens, attention_mask).clone()
    rows = torch.arange(len(tokens), device=tokens.device)
    if protect_bos:
        maskable[rows, maskable.float().argmax(-1)] = False
    if protect_query:
        maskable[rows, query.to(tokens.device)] = False
    return maskable


def top_fraction(
    scores: Float[Tensor, "batch pos"],
    maskable: Bool[Tensor, "batch pos"],
    fraction: float,
    by: Literal["signed", "abs"] = "signed",
) -> Bool[Tensor, "batch pos"]:
    """The ``round(fraction * n_maskable)`` highest-scored maskable tokens of each prompt.

    Rounds half up; ties go to the earlier position.
    """
    key = scores.detach().double().to(maskable.device)
    key = key.abs() if by == "abs" else key
    key = torch.where(maskable, key, torch.tensor(-torch.inf, dtype=key.dtype))
    order = key.argsort(dim=-1, descending=True, stable=True)
    counts = torch.floor(fraction * maskable.sum(-1) + 0.5).long()
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < counts[:, None]) & maskable


@dataclass
class MaskedInput:
    """A masked batch, ready to run: tokens, mask, hooks, and where each old position went."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Tensor | None
    zeroed: Bool[Tensor, "batch pos"] | None
    new_index: Int[Tensor, "batch old_pos"]

    def hooks(self) -> list[tuple[str, Callable]]:
        if self.zeroed is None or not self.zeroed.any():
            return []
        keep = (~self.zeroed).unsqueeze(-1)

        def zero(value: Tensor, hook) -> Tensor:
            return value * keep.to(value)

        return [("hook_embed", zero)]

    def kwargs(self) -> dict[str, Any]:
        return {} if self.attention_mask is None else {"attention_mask": self.attention_mask}

    def map_positions(self, positions: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
        rows = torch.arange(len(positions), device=positions.device)
        mapped = self.new_index[rows, positions]
        if (mapped < 0).any():
            raise ValueError("masking dropped every token up to the metric's position")
        return mapped


def mask_tokens(
    tokens: Int[Tensor, "batch pos"],
    masked: Bool[Tensor, "batch pos"],
    *,
    masking: Masking,
    fill_id: int,
    attention_mask: Tensor | None = None,
) -> MaskedInput:
    """Apply ``masking`` to the ``masked`` positions."""
    identity = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    if masking == "replace":
        new = torch.where(masked, torch.full_like(tokens, fill_id), tokens)
        return MaskedInput(new, attention_mask, None, identity)
    if masking == "zero":
        return MaskedInput(tokens, attention_mask, masked, identity)
    if masking != "drop":
        raise ValueError(f"masking must be 'replace', 'zero' or 'drop', not {masking!r}")
    kept = real_mask(tokens, attention_mask) & ~masked
    lengths = kept.sum(-1)
    if (lengths == 0).any():
        raise ValueError("drop masking removed every token of a prompt; protect BOS")
    width = int(lengths.max())
    new = torch.full((len(tokens), width), fill_id, dtype=tokens.dtype, device=tokens.device)
    slots = torch.arange(width, device=tokens.device).expand(len(tokens), width)
    new_mask = slots < lengths[:, None]
    new[new_mask] = tokens[kept]
    padded = attention_mask is not None or bool((lengths != width).any())
    return MaskedInput(new, new_mask.long() if padded else None, None, kept.cumsum(-1) - 1)
