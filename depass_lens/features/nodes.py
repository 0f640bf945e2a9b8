"""The nodes of a feature graph and the real quantities each one carries.

Senders write into the replacement model: token and position embeddings (one node per position),
active latents ``(site, pos, index)`` (decoder vector times activation), one reconstruction error
per ``(site, pos)``, and constants (each site's ``b_dec``, each bias or frozen remainder the
linearisation records, per layer). Receivers read it: active latents (their pre-activation) and
the targets. Latents are both. Node order follows circuit-tracer's adjacency: latents, errors,
embeddings, constants, targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

NodeKind = Literal["latent", "error", "token", "position", "constant", "target"]


@dataclass(frozen=True)
class FeatureNode:
    """One node: ``name`` is unique (``L1.mlp[37]@4``, ``L1.mlp.error@4``, ``token@4``,
    ``position@4``, ``L0.attn.b_O``, ``L1.mlp.b_dec``, or the target's name).

    ``layer``: the site's layer (-1 for embeddings, ``n_layers`` for targets and the final
    norm); ``pos``: the position (``None`` for constants); ``site``: the dictionary (latents,
    errors, ``b_dec``); ``index``: the latent, or the target scalar's index.
    """

    name: str
    kind: NodeKind
    layer: int
    pos: int | None = None
    site: str | None = None
    index: int | None = None


@dataclass
class ActiveLatents:
    """A site's latents that are nodes, position-major: ``pos``, ``index``, ``activation`` (on
    the prompt), ``coefficient`` (what multiplies the decoder vector in the graph: the activation,
    or its change from a corrupted run) and ``pre_activation`` (the receiver's real value: the
    pre-activation, or its change) with ``magnitude``: ``sum_i |x_i W_enc[i, j]| + |b_j|`` (of
    both runs for a change), the size the rounding of the real value scales with."""

    pos: Int[Tensor, " n"]
    index: Int[Tensor, " n"]
    activation: Float[Tensor, " n"]
    coefficient: Float[Tensor, " n"]
    pre_activation: Float[Tensor, " n"]
    magnitude: Float[Tensor, " n"]  # the size of what was subtracted to get pre_activation

    @classmethod
    def of(
        cls,
        acts: Float[Tensor, "pos d_sae"],
        pre: Float[Tensor, "pos d_sae"],
        size: Float[Tensor, "pos d_sae"],
    ) -> ActiveLatents:
        """The latents active on the prompt."""
        pos, index = torch.nonzero(acts, as_tuple=True)  # row-major: by position, then latent
        a = acts[pos, index]
        return cls(pos, index, a, a, pre[pos, index], size[pos, index])

    @classmethod
    def changed(
        cls,
        acts: Float[Tensor, "pos d_sae"],
        pre: Float[Tensor, "pos d_sae"],
        ref_acts: Float[Tensor, "pos d_sae"],
        ref_pre: Float[Tensor, "pos d_sae"],
        size: Float[Tensor, "pos d_sae"],
    ) -> ActiveLatents:
        """The latents active on either prompt, scored by their change (clean - corrupted);
        ``size``: both runs' (a change is only as exact as the two values it subtracts)."""
        pos, index = torch.nonzero((acts != 0) | (ref_acts != 0), as_tuple=True)
        delta, pre_delta = acts - ref_acts, pre - ref_pre
        return cls(
            pos, index, acts[pos, index], delta[pos, index], pre_delta[pos, index], size[pos, index]
        )

    def __len__(self) -> int:
        return int(self.pos.numel())


def latent_name(site: str, index: int, pos: int) -> str:
    return f"{site}[{index}]@{pos}"


__all__ = ["ActiveLatents", "FeatureNode", "NodeKind", "latent_name"]
