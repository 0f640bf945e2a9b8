"""What a latent writes, read as tokens: its decoder vector through the unembedding.

A latent's decoder vector is mapped into the residual stream (``hook_z`` latents through
``W_O``), scaled by the final norm's weight and read by ``W_U``: the tokens it promotes most when
it fires, before any later layer acts (a logit lens of the decoder, as circuit-tracer's and
Neuronpedia's feature pages show). Computed only for the latents asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.features.graph import FeatureGraph
from depass_lens.features.sites import Site


def stream_directions(adapter: ModelAdapter, site: Site, latents: Tensor) -> Tensor:
    """``[n, d_model]``: the decoder vectors of ``latents`` as written into the stream."""
    W_dec = site.view.W_dec[latents].to(adapter.device, adapter.dtype)
    if site.placement.kind != "z":
        return W_dec
    W_O = adapter.attention(site.layer).W_O.to(W_dec.dtype)
    per_head = einops.rearrange(W_dec, "n (h e) -> n h e", h=W_O.shape[0])
    return einops.einsum(per_head, W_O, "n h e, h e d -> n d")


@torch.no_grad()
def decoder_lens(
    adapter: ModelAdapter,
    sites: Sequence[Site],
    graph: FeatureGraph,
    nodes: Sequence[int],
    k: int = 5,
) -> dict[int, list[tuple[str, float]]]:
    """For each latent node in ``nodes``, the ``k`` tokens its decoder vector promotes most, with
    their logit (per unit activation)."""
    by_name = {s.name: s for s in sites}
    norm = adapter.final_norm()
    out: dict[int, list[tuple[str, float]]] = {}
    groups: dict[str, list[int]] = {}
    for i in nodes:
        node = graph.nodes[i]
        if node.kind == "latent" and node.site in by_name:
            groups.setdefault(node.site, []).append(i)
    for site_name, members in groups.items():
        site = by_name[site_name]
        latents = torch.tensor([graph.nodes[i].index for i in members], device=adapter.device)
        directions = stream_directions(adapter, site, latents)
        if norm.w is not None:
            directions = directions * norm.w.to(directions.dtype)
        logits = directions @ adapter.W_U.to(directions.dtype)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        for i, ids, values in zip(members, top.indices.tolist(), top.values.tolist()):
            out[i] = [(_token(adapter, t), round(float(v), 4)) for t, v in zip(ids, values)]
    return out


def _token(adapter: ModelAdapter, token: int) -> str:
    try:
        return str(adapter.model.to_string([token]))
    except Exception:  # noqa: BLE001 - a model without a tokenizer: the id names the token
        return str(token)


__all__ = ["decoder_lens", "stream_directions"]
