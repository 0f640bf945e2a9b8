"""Forward passes the protocols share: from the residual input, from a layer, final logits only.

Reading only the logits at the metric's position (one row per prompt) keeps many-pass protocols
(per-component ablation, masking grids) cheap in memory for large vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.levels import Hook


def tile(t: Tensor | None, times: int) -> Tensor | None:
    """``t`` repeated ``times`` along the batch axis, in ``(m b)`` order (``None`` stays)."""
    if t is None or times == 1:
        return t
    return einops.repeat(t, "b ... -> (m b) ...", m=times)


@dataclass
class ResidualInput:
    """The stream entering block 0 (token + additive positional embedding) and what rides along.

    Running the model from ``resid`` (``start_at_layer=0``) reproduces ``model(tokens)``; scaling
    ``resid`` scales exactly the "input embeddings" gradient methods differentiate against.
    """

    resid: Float[Tensor, "batch pos d_model"]
    attention_mask: Tensor | None
    shortformer_pos_embed: Tensor | None

    def kwargs(self, times: int = 1) -> dict[str, Any]:
        """Forward keyword arguments, for the batch repeated ``times`` (``(m b)`` order)."""

        return {
            "attention_mask": tile(self.attention_mask, times),
            "shortformer_pos_embed": tile(self.shortformer_pos_embed, times),
        }


@torch.no_grad()
def residual_input(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
) -> ResidualInput:
    """Embed ``tokens`` exactly as ``model.forward`` does."""
    resid, _, shortformer, mask = model.input_to_embed(tokens, attention_mask=attention_mask)
    return ResidualInput(resid, mask, shortformer)


def _take_rows(positions: Tensor) -> Callable:
    def take(value: Tensor, hook) -> Tensor:
        rows = torch.arange(value.shape[0], device=value.device)
        return value[rows, positions.to(value.device)].unsqueeze(1)

    return take


def final_logits(
    model: TLModel,
    input: Tensor,
    positions: Int[Tensor, " batch"],
    *,
    fwd_hooks: Sequence[Hook] = (),
    **forward_kwargs: Any,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits at one position per row, unembedding only that position.

    ``input`` is tokens, or a residual stream with ``start_at_layer`` in ``forward_kwargs``.
    """
    last = f"blocks.{make_adapter(model).n_layers - 1}.hook_resid_post"
    hooks = [*fwd_hooks, (last, _take_rows(positions))]
    kwargs = {k: v for k, v in forward_kwargs.items() if v is not None}
    return model.run_with_hooks(input, fwd_hooks=hooks, **kwargs)[:, 0]


@torch.no_grad()
def resid_pre(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[int],
    attention_mask: Tensor | None = None,
) -> dict[int, Tensor]:
    """The clean stream entering each of ``layers`` (to restart the forward pass there)."""
    names = {f"blocks.{layer}.hook_resid_pre" for layer in layers}
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n in names, attention_mask=attention_mask
    )
    return {layer: cache[f"blocks.{layer}.hook_resid_pre"] for layer in layers}
