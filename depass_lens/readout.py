"""Reading decomposed states out: through the frozen final norm to logits, or into a target.

Shared by forward-mode results (:class:`~depass_lens.results.DecomposedCache`) and the wrapper:
each component's share of a target is the target's affine read-out applied to that component,
with the target's constant on the ``bias`` component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.decomposition import add_to_bias
from depass_lens.norms import frozen_norm_linear
from depass_lens.targets import Logit, Target, TargetContext


@dataclass
class Prepared:
    """A validated input: tokens, attention mask (``None`` without padding) and token strings."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None
    str_tokens: list[list[str]] | None


class Readout:
    """Reads decomposed states out through the (frozen) final norm and the unembedding."""

    def __init__(self, adapter: ModelAdapter, prepared: Prepared):
        self.adapter = adapter
        self.prepared = prepared

    @torch.no_grad()
    def logits(
        self, final: Float[Tensor, "batch comp pos d_model"]
    ) -> Float[Tensor, "batch comp pos d_vocab"]:
        logits = einops.einsum(final, self.adapter.W_U.to(final.dtype), "b c p d, d v -> b c p v")
        logits[:, -1] += self.adapter.b_U
        return logits

    def target_context(self) -> TargetContext:
        return TargetContext(self.adapter, self.prepared.tokens, self.prepared.attention_mask)

    @torch.no_grad()
    def logit_attribution(
        self, final: Tensor, token: Any, pos: int = -1
    ) -> Float[Tensor, "batch comp"]:
        return read_target(final, Logit(token, pos), self.target_context())[:, 0]

    @torch.no_grad()
    def lens(
        self, state: Float[Tensor, "batch comp pos d_model"]
    ) -> Float[Tensor, "batch comp pos d_model"]:
        """Logit lens on components: the final norm, with the scale of the real state *here*.

        The scale is that of the summed components (the real residual at this hook), so the
        components' shares add up to TransformerLens's logit lens (``accumulated_resid(...,
        apply_ln=True)``); at the last ``hook_resid_post`` that is the final-norm output.
        """
        norm = self.adapter.final_norm()
        if norm.kind == "none":
            return state
        real = state.sum(1)
        if norm.centres:
            real = real - real.mean(-1, keepdim=True)
        scale = (real.pow(2).mean(-1, keepdim=True) + self.adapter.eps).sqrt()
        out = frozen_norm_linear(state, norm, scale)
        if norm.w is not None:
            out = out * norm.w
        if norm.b is not None:
            out = add_to_bias(out, norm.b)
        return out


def read_target(
    state: Float[Tensor, "batch comp pos d_model"], target: Target, ctx: TargetContext
) -> Float[Tensor, "batch k comp"]:
    """Each component's share of each scalar of ``target`` (constants go to the bias)."""
    weights, constants = target.functional(ctx)
    # "...": a per-head hook (hook_z) has [head, d_head] where the stream has d_model
    scores = einops.einsum(state, weights.to(state.dtype), "b c p ..., b k p ... -> b k c")
    scores[..., -1] += constants.to(scores.dtype)
    return scores
