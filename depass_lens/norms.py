"""Normalisation layers with their scale frozen: linear maps, their transposes, their constants.

With the real scale held fixed, a LayerNorm is ``centre(x) / scale * w + b`` and an RMSNorm
``x / scale * w``: a linear map plus the constant ``b``. Sources, constants and circuits all need
these maps (to send a head's output through a post-attention norm, to pull a gradient back through
one, to find what a norm's bias adds), so they live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter, NormWeights
from depass_lens.frozen import Activations


def frozen_norm_linear(
    x: Float[Tensor, "batch comp pos d"], norm: NormWeights, scale: Float[Tensor, "batch pos 1"]
) -> Float[Tensor, "batch comp pos d"]:
    """The linear part of a norm with frozen scale: centre (LayerNorm only), divide by the scale."""
    if norm.centres:
        x = x - x.mean(dim=-1, keepdim=True)
    return (x / scale.unsqueeze(1)).to(x.dtype)  # divided in the wider dtype (float32 scale)


def frozen_scale(
    acts: Activations, norm: NormWeights | None
) -> Float[Tensor, "batch pos 1"] | None:
    """A norm's real scale from the activations (a per-head axis, if any, dropped: heads agree)."""
    if norm is None or norm.scale_hook is None:
        return None
    scale = acts[norm.scale_hook]
    return scale[:, :, 0] if scale.ndim == 4 else scale


def norm_map(
    x: Float[Tensor, "batch comp pos d"], norm: NormWeights | None, scale: Tensor | None
) -> Float[Tensor, "batch comp pos d"]:
    """A frozen norm's linear part and weight (no bias) applied to each component."""
    if norm is None or norm.kind == "none" or scale is None:
        return x
    x = frozen_norm_linear(x, norm, scale)
    return x * norm.w if norm.w is not None else x


def norm_map_transpose(
    grad: Float[Tensor, "batch pos d"], norm: NormWeights | None, scale: Tensor | None
) -> Float[Tensor, "batch pos d"]:
    """The transpose of :func:`norm_map`: pulls a gradient back through a frozen norm."""
    if norm is None or norm.kind == "none" or scale is None:
        return grad
    if norm.w is not None:
        grad = grad * norm.w
    return frozen_norm_linear(grad.unsqueeze(1), norm, scale)[:, 0]  # centring is symmetric


def norm_bias(norm: NormWeights | None, like: Tensor) -> Tensor:
    """The norm's bias broadcast like ``like`` (zeros without one)."""
    if norm is None or norm.b is None:
        return torch.zeros_like(like)
    return norm.b.expand_as(like)


def post_sublayer_norms(
    adapter: ModelAdapter, layer: int, which: Literal["attn", "mlp"]
) -> list[NormWeights]:
    """Norms applied to a sublayer's output before it joins the stream, in order.

    Gemma-style ``ln*_post`` and, for OLMo 2/3 post-norm models, the block's own ``ln1``/``ln2``.
    """
    norms = adapter.block_norms(layer)
    ln, ln_post = (
        (norms["ln1"], norms["ln1_post"])
        if which == "attn"
        else (
            norms["ln2"],
            norms["ln2_post"],
        )
    )
    out = []
    if adapter.post_norm and ln is not None:
        out.append(ln)
    if ln_post is not None:
        out.append(ln_post)
    return [n for n in out if n.kind != "none"]


def post_norm_scale_hooks(
    adapter: ModelAdapter, layer: int, which: Literal["attn", "mlp"]
) -> list[str]:
    """The scale hooks of :func:`post_sublayer_norms` (cache entries their maps read)."""
    return [n.scale_hook for n in post_sublayer_norms(adapter, layer, which) if n.scale_hook]


def through_norms(
    acts: Activations,
    norms: Sequence[NormWeights],
    parts: Float[Tensor, "batch comp pos d"],
    bias: Float[Tensor, "batch pos d"],
) -> tuple[Float[Tensor, "batch comp pos d"], Float[Tensor, "batch pos d"]]:
    """Send components and a constant through frozen norms: each component gets the linear part,
    the constant also gets each norm's bias."""
    for norm in norms:
        scale = frozen_scale(acts, norm)
        parts = norm_map(parts, norm, scale)
        bias = norm_map(bias.unsqueeze(1), norm, scale)[:, 0] + norm_bias(norm, bias)
    return parts, bias


def pull_back(
    acts: Activations, norms: Sequence[NormWeights], grad: Float[Tensor, "batch pos d"]
) -> Float[Tensor, "batch pos d"]:
    """The transpose of the linear part of :func:`through_norms` applied to a gradient."""
    for norm in reversed(norms):
        grad = norm_map_transpose(grad, norm, frozen_scale(acts, norm))
    return grad
