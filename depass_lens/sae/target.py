"""An SAE latent's pre-activation as a DePass target: "what makes latent i fire here?".

The pre-activation ``<W_enc[:, i], x - b_dec> + b_enc[i]`` is an affine read-out of the SAE's
input ``x`` (JumpReLU thresholds and TopK selection only gate it afterwards; a gated SAE's
magnitude path is used). So it is an ordinary target, read at the SAE's input hook: tokens,
heads, neurons or the latents of an earlier SAE get their exact shares of it (latent -> latent
edges with an :class:`~depass_lens.sae.SAELatents` source upstream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import torch

from depass_lens.adapter import ModelAdapter
from depass_lens.sae.placement import place
from depass_lens.sae.view import SAEView, as_sae_view
from depass_lens.targets import Target, resolve_positions


class SAELatent(Target):
    """Latent ``latent``'s pre-activation at ``pos`` (one per prompt, or one for all).

    Args:
        sae: an SAE or transcoder (see :class:`~depass_lens.sae.SAELatents`).
        latent: the latent index.
        pos: the position, per prompt (``-1``: each prompt's last real token).
        hook: override the SAE's (input) hook name.
        name: label of the target (default ``"<sae>/F<latent> pre"``).
    """

    def __init__(
        self,
        sae: Any,
        latent: int,
        pos: int | Sequence[int] = -1,
        *,
        hook: str | None = None,
        name: str | None = None,
    ):
        self.view: SAEView = as_sae_view(sae, hook)
        self.latent = self.view.check_latent(latent, "SAELatent")
        self.pos = pos
        self.name = name

    def __repr__(self) -> str:
        return f"SAELatent({self.view.name!r}, latent={self.latent}, pos={self.pos})"

    def read_hook(self, adapter: ModelAdapter) -> str:
        placement = place(self.view, adapter, "SAELatent")
        hook = placement.hook_in
        if hook.endswith("hook_mlp_in"):  # the same value as the stream the MLP reads
            return adapter.resid_hook(placement.layer, "pre" if adapter.parallel else "mid")
        return hook

    def functional(self, ctx):
        adapter = ctx.adapter
        hook = self.read_hook(adapter)
        w, c = self.view.pre_activation(self.latent, adapter.dtype, adapter.device)
        positions = resolve_positions(self.pos, ctx)
        batch, n_pos = ctx.tokens.shape
        vector = w
        if hook.endswith("attn.hook_z"):  # read per head, as TransformerLens stores hook_z
            vector = einops.rearrange(w, "(h e) -> h e", h=adapter.n_heads)
        weights = vector.new_zeros(batch, 1, n_pos, *vector.shape)
        weights[torch.arange(batch, device=weights.device), 0, positions] = vector
        return weights, vector.new_full((batch, 1), c)

    def names(self, ctx):
        return [self.name or f"{self.view.name}/F{self.latent} pre"]


__all__ = ["SAELatent"]
