"""Decoder logit lens: the tokens a latent's decoder vector promotes, and a figure of top latents.

A latent writes ``a_i W_dec[i]`` into the stream; read through the final norm's linear part (its
centring and weight; the scale only rescales) and the unembedding, ``W_dec[i]`` ranks the tokens
the latent pushes up. Together with the latent's DePass score this says *what* a latent that
drives a target is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.results import Attribution
from depass_lens.sae.placement import place
from depass_lens.sae.view import as_sae_view


def decoder_lens(
    adapter: ModelAdapter, sae: Any, latents: Sequence[int]
) -> Float[Tensor, "n d_vocab"]:
    """Each latent's decoder vector, mapped to the stream, read out as logits (no biases)."""
    view = as_sae_view(sae)
    placement = place(view, adapter, "decoder_lens")
    rows = view.W_dec[list(latents)].to(device=adapter.device, dtype=adapter.dtype)
    if placement.kind == "z":  # through W_O, summed over heads
        per_head = einops.rearrange(rows, "n (h e) -> n h e", h=adapter.n_heads)
        rows = einops.einsum(
            per_head, adapter.attention(placement.layer).W_O, "n h e, h e d -> n d"
        )
    norm = adapter.final_norm()
    if norm.centres:
        rows = rows - rows.mean(-1, keepdim=True)
    if norm.w is not None:
        rows = rows * norm.w
    return rows @ adapter.W_U


def top_tokens(
    adapter: ModelAdapter, sae: Any, latents: Sequence[int], k: int = 5
) -> list[list[str]]:
    """The ``k`` tokens each latent's decoder vector promotes most."""
    lens = decoder_lens(adapter, sae, latents)
    ids = lens.topk(min(k, lens.shape[-1]), dim=-1).indices.tolist()
    model = adapter.model
    if model.tokenizer is None:
        return [[f"#{i}" for i in row] for row in ids]
    return [[str(model.to_single_str_token(i)) for i in row] for row in ids]


def latents_figure(
    attribution: Attribution,
    adapter: ModelAdapter,
    sae: Any,
    *,
    k: int = 15,
    lens_k: int = 3,
    batch: int | None = None,
    target: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Bars of the ``k`` latents with the largest absolute score, each labelled with the tokens
    its decoder promotes (the error component is shown too: it is part of the split)."""
    index = [i for i, lab in enumerate(attribution.labels) if lab.kind in ("latent", "sae_error")]
    if not index:
        raise ValueError("this attribution has no SAE latents (use an SAELatents source)")
    scores = attribution.scores[:, target][:, index]
    scores = (scores.mean(0) if batch is None else scores[batch]).detach().float().cpu()
    order = scores.abs().argsort(descending=True)[:k].tolist()
    labels = [attribution.labels[index[i]] for i in order]
    latent_ids = [int(lab.index) for lab in labels if lab.kind == "latent"]  # type: ignore[arg-type]
    lens = dict(zip(latent_ids, top_tokens(adapter, sae, latent_ids, lens_k))) if latent_ids else {}
    names = [
        f"{lab} → {', '.join(lens[int(lab.index)])}" if lab.kind == "latent" else str(lab)  # type: ignore[arg-type]
        for lab in labels
    ]
    values = [float(scores[i]) for i in order]
    fig = go.Figure(
        go.Bar(
            x=values[::-1],
            y=names[::-1],
            orientation="h",
            marker_color=["#b2182b" if v > 0 else "#2166ac" for v in values[::-1]],
            hovertemplate="%{y}<br>score %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title
        or f"Top {len(order)} SAE latents for {attribution.target_names[target]} (→ decoder lens)",
        xaxis_title="score (share of the target)",
        yaxis={"type": "category", "dtick": 1},
        template="plotly_white",
        height=max(300, 24 * len(order)),
        margin={"l": 260},
    )
    return fig


__all__ = ["decoder_lens", "latents_figure", "top_tokens"]
