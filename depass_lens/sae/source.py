"""SAE and transcoder latents as a DePass source: one more initial decomposition.

At the SAE's hook ``x = sum_i a_i W_dec[i] + b_dec + eps`` with ``eps = x - x_hat`` the
reconstruction error: one component per latent (its decoder contribution ``a_i W_dec[i]`` at every
position, zero where it is off), the error as its own visible component, ``b_dec`` as a constant
(in ``bias``). A transcoder's latents sit at the MLP output, with ``mlp_out - transcoder(x)`` as
the error. Output-side SAEs add the stream before that output as ``rest``. The engine then
propagates these components like any others; in adjoint mode ``score_i = sum_pos a_i <W_dec[i],
g>`` from the one backward, so no latent is materialised there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.decomposition import BIAS, ComponentLabel, Decomposition
from depass_lens.errors import DePassInputError
from depass_lens.frozen import Activations
from depass_lens.sae.placement import Placement, encode, place
from depass_lens.sae.view import SAEView, as_sae_view
from depass_lens.sources import Source, SourceContext


@dataclass(frozen=True)
class LatentLabel(ComponentLabel):
    """A latent component: ``text`` names the SAE, ``pos`` is set when split by position."""

    def __str__(self) -> str:
        where = f"@{self.pos}" if self.pos is not None else ""
        if self.kind == "latent":
            return f"{self.text}/F{self.index}{where}"
        return f"{self.text}/{self.kind}"


@dataclass
class _Split:
    """The parts of one SAE start point, in the SAE's output space unless said otherwise."""

    acts: Float[Tensor, "batch pos d_sae"]
    W_dec: Float[Tensor, "d_sae d_out"]
    latents: Int[Tensor, " n"]  # the latent of each component
    positions: Int[Tensor, " n"] | None  # its position (by_position), else None
    others: Float[Tensor, "batch pos d_out"] | None  # latents not selected, pooled
    error: Float[Tensor, "batch pos d_out"]
    skip: Float[Tensor, "batch pos d_out"] | None
    bias: Float[Tensor, "batch pos d_model"]  # b_dec mapped to the stream, plus constants
    rest: Float[Tensor, "batch pos d_model"] | None  # the stream before the SAE's output


class SAELatents(Source):
    """The active latents of an SAE or transcoder as components (+ error, rest, ``bias``).

    Args:
        sae: a SAELens ``SAE``/``Transcoder`` or any object with ``W_enc``, ``b_enc``, ``W_dec``,
            ``b_dec``, ``encode`` and a hook name (see :mod:`depass_lens.sae.view`).
        latents: which latents get their own component. ``None``: every latent active at some
            position of the batch (the union; a latent is zero where it is off). A list: exactly
            those (active or not); the other active latents are pooled into ``other_latents``,
            so nothing is dropped.
        by_position: one component per (latent, position) pair that is active for some prompt,
            instead of one per latent: the score of latent i *at position p*.
        hook: override the hook name the SAE carries (a transcoder's input hook).
        hook_out: override a transcoder's output hook name.
        name: label of the SAE in component names (default from its hook, e.g. ``L1.resid_post``).
    """

    def __init__(
        self,
        sae: Any,
        latents: Sequence[int] | None = None,
        *,
        by_position: bool = False,
        hook: str | None = None,
        hook_out: str | None = None,
        name: str | None = None,
    ):
        self.view: SAEView = as_sae_view(sae, hook, hook_out, name)
        self.latents = (
            None if latents is None else [self.view.check_latent(i, "SAELatents") for i in latents]
        )
        if self.latents is not None and len(set(self.latents)) != len(self.latents):
            raise DePassInputError("SAELatents: latents contains duplicates")
        self.by_position = by_position

    def __repr__(self) -> str:
        chosen = "active" if self.latents is None else f"{len(self.latents)} chosen"
        return f"SAELatents({self.view.name!r}, latents={chosen}, by_position={self.by_position})"

    def placement(self, adapter: ModelAdapter) -> Placement:
        return place(self.view, adapter, "SAELatents")

    def start_hooks(self, adapter):
        return [self.placement(adapter).start]

    def needed_hooks(self, adapter):
        return self.placement(adapter).needed_hooks(adapter)

    def count(self, adapter, n_pos):
        return (len(self.latents) if self.latents is not None else self.view.d_sae) + 4

    # ------------------------------------------------------------------ the split
    def activations(self, ctx: SourceContext) -> Float[Tensor, "batch pos d_sae"]:
        """Latent activations on this input, by the SAE's own encoder (in the model's dtype)."""
        placement = self.placement(ctx.adapter)
        state = ctx[placement.start]
        return encode(self.view, placement, cast(Activations, ctx.cache), state.dtype)

    def _chosen(self, acts: Tensor) -> tuple[Tensor, Tensor | None]:
        device = acts.device
        if self.latents is not None:
            latents = torch.tensor(self.latents, dtype=torch.long, device=device)
            if not self.by_position:
                return latents, None
            n_pos = acts.shape[1]
            grid = torch.cartesian_prod(latents, torch.arange(n_pos, device=device))
            return grid[:, 0], grid[:, 1]
        active = acts != 0
        if not self.by_position:
            return active.any(dim=(0, 1)).nonzero()[:, 0], None
        pairs = active.any(dim=0).nonzero()  # (pos, latent), sorted by position
        order = torch.argsort(pairs[:, 1] * acts.shape[1] + pairs[:, 0])  # by latent, then pos
        return pairs[order, 1], pairs[order, 0]

    def _split(self, ctx: SourceContext) -> _Split:
        adapter, view = ctx.adapter, self.view
        placement = self.placement(adapter)
        acts_all = cast(Activations, ctx.cache)
        state = ctx[placement.start]
        dtype, device = state.dtype, state.device
        acts = encode(view, placement, acts_all, dtype)
        W_dec = view.W_dec.to(device=device, dtype=dtype)
        b_dec = view.b_dec.to(device=device, dtype=dtype)
        x_in = placement.read(acts_all, placement.hook_in)
        x_out = placement.read(acts_all, placement.hook_out)
        recon = acts @ W_dec + b_dec
        skip = None
        if view.W_skip is not None:
            skip = x_in @ view.W_skip.to(device=device, dtype=dtype).T
            recon = recon + skip
        latents, positions = self._chosen(acts)
        others = None
        if self.latents is not None:
            mask = torch.ones(view.d_sae, dtype=torch.bool, device=device)
            mask[latents] = False
            others = acts[..., mask] @ W_dec[mask]
        empty = x_out.unsqueeze(1)[:, :0]
        _, bias = placement.to_stream(adapter, acts_all, empty, b_dec.expand_as(x_out))
        rest = None
        if placement.kind != "stream":  # the stream before the SAE's output is not split
            out, constants = placement.to_stream(
                adapter,
                acts_all,
                x_out.unsqueeze(1),
                torch.zeros_like(x_out),
            )
            rest = state - out[:, 0] - constants
        return _Split(acts, W_dec, latents, positions, others, x_out - recon, skip, bias, rest)

    def _labels(self, split_latents: Tensor, positions: Tensor | None, adapter) -> list:
        layer = self.placement(adapter).layer
        name = self.view.name
        pos = positions.tolist() if positions is not None else [None] * len(split_latents)
        labels: list[ComponentLabel] = [
            LatentLabel("latent", layer, int(i), p, name)
            for i, p in zip(split_latents.tolist(), pos)
        ]
        return labels

    def _tail_labels(self, split: _Split, adapter: ModelAdapter) -> list[ComponentLabel]:
        layer, name = self.placement(adapter).layer, self.view.name
        tail: list[ComponentLabel] = []
        if split.others is not None:
            tail.append(LatentLabel("other_latents", layer, text=name))
        tail.append(LatentLabel("sae_error", layer, text=name))
        if split.skip is not None:
            tail.append(LatentLabel("sae_skip", layer, text=name))
        if split.rest is not None:
            tail.append(ComponentLabel("rest", layer))
        return tail + [BIAS]

    def label_groups(self, ctx):
        split = self._split(ctx)
        return [
            self._labels(split.latents, split.positions, ctx.adapter)
            + self._tail_labels(split, ctx.adapter)
        ]

    def decompositions(self, ctx):
        adapter = ctx.adapter
        placement = self.placement(adapter)
        split = self._split(ctx)
        batch, n_pos, _ = split.acts.shape
        coeff = split.acts[:, :, split.latents]  # [b p n]
        if split.positions is not None:  # each component lives at its own position only
            keep = torch.zeros_like(coeff)
            index = torch.arange(len(split.latents), device=coeff.device)
            keep[:, split.positions, index] = 1
            coeff = coeff * keep
        parts = einops.einsum(coeff, split.W_dec[split.latents], "b p n, n d -> b n p d")
        tail = [t for t in (split.others, split.error, split.skip) if t is not None]
        if tail:
            parts = torch.cat([parts, torch.stack(tail, dim=1)], dim=1)
        zero = torch.zeros_like(split.error)
        mapped, _ = placement.to_stream(adapter, cast(Activations, ctx.cache), parts, zero)
        extra = [split.rest] if split.rest is not None else []
        comps = torch.cat([mapped, torch.stack([*extra, split.bias], dim=1)], dim=1)
        labels = self._labels(split.latents, split.positions, adapter) + self._tail_labels(
            split, adapter
        )
        return [Decomposition(placement.start, comps, labels)]

    def scores(self, ctx, grads):
        """``a_i <W_dec[i], M^T g>`` per position from the one gradient ``g`` at the start hook.

        ``M^T`` pulls ``g`` back into the SAE's output space (identity, or through the frozen
        post-attention norms and ``W_O`` for ``hook_z``); no latent's contribution is built.
        """
        adapter = ctx.adapter
        placement = self.placement(adapter)
        grad = grads[self.gradient_hooks(adapter)[0]]
        split = self._split(ctx)
        g_out = placement.pull_back(adapter, cast(Activations, ctx.cache), grad)
        latent_scores = latent_gradient_scores(
            split.acts, split.W_dec, g_out, split.latents, split.positions
        )
        tail = [t for t in (split.others, split.error, split.skip) if t is not None]
        parts = [latent_scores] + [(t * g_out).sum((-1, -2))[:, None] for t in tail]
        if split.rest is not None:
            parts.append((split.rest * grad).sum((-1, -2))[:, None])
        parts.append((split.bias * grad).sum((-1, -2))[:, None])
        return [torch.cat(parts, dim=-1)]


#: Elements of the largest ``[batch, pos, latent]`` or ``[batch, pair, d]`` temporary
#: :func:`latent_gradient_scores` forms at once (256 MiB in float32).
SCORE_CHUNK_ELEMENTS = 2**26


def latent_gradient_scores(
    acts: Float[Tensor, "batch pos d_sae"],
    W_dec: Float[Tensor, "d_sae d"],
    grad: Float[Tensor, "batch pos d"],
    latents: Int[Tensor, " n"],
    positions: Int[Tensor, " n"] | None = None,
) -> Float[Tensor, "batch n"]:
    """``sum_p a_i(p) <W_dec[i], g(p)>`` per chosen latent ``i`` (summed over positions), or
    ``a_i(p) <W_dec[i], g(p)>`` per chosen ``(latent, position)`` pair.

    Formed a block of latents (or pairs) at a time, so memory stays at
    :data:`SCORE_CHUNK_ELEMENTS` whatever the dictionary's width, the prompt's length or the
    number of pairs; a pair reads only its own position (no ``pos x pair`` tensor).
    """
    batch, n_pos, d = grad.shape
    per_item = batch * (d if positions is not None else n_pos)
    step = max(1, SCORE_CHUNK_ELEMENTS // max(per_item, 1))
    out = grad.new_empty(batch, len(latents))
    for start in range(0, len(latents), step):
        part = slice(start, start + step)
        rows = W_dec[latents[part]]  # [n d]
        if positions is None:
            along = einops.einsum(grad, rows, "b p d, n d -> b p n")
            out[:, part] = (acts[:, :, latents[part]] * along).sum(1)
        else:
            pos, lat = positions[part], latents[part]
            along = einops.einsum(grad[:, pos], rows, "b n d, n d -> b n")
            out[:, part] = acts[:, pos, lat] * along
    return out


__all__ = ["LatentLabel", "SAELatents", "latent_gradient_scores"]
