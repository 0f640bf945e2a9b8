"""Dictionaries placed in a model: which module each one replaces in the local replacement model.

A *site* is one dictionary (transcoder, skip transcoder, residual, attention-output or ``hook_z``
SAE) checked against the model it explains: its hooks exist, its widths match, its weights are
finite, and no two dictionaries claim the same output (two transcoders on one MLP would count it
twice). In the replacement model a site's output hook is cut from everything before it and
rebuilt from its active latents' decoder vectors, its reconstruction error and ``b_dec``; its
latents' pre-activations read its input hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.errors import DePassInputError
from depass_lens.sae.cross_layer import CrossLayerTranscoder
from depass_lens.sae.placement import Placement, place
from depass_lens.sae.view import SAEView, as_sae_view

DictionariesLike = Sequence[Any] | Mapping[str, Any]


@dataclass(frozen=True)
class Site:
    """One dictionary in place: ``name`` labels its nodes (``L1.mlp``, ``L0.z``, ...)."""

    name: str
    view: SAEView
    placement: Placement
    #: Decoders into later sites' outputs (a cross-layer transcoder's): ``(site, [d_sae, d_out])``
    decoders: tuple[tuple[str, Tensor], ...] = ()

    @property
    def layer(self) -> int:
        return self.placement.layer

    @property
    def hook_in(self) -> str:
        return self.view.hook_in

    @property
    def hook_out(self) -> str:
        return self.view.hook_out

    @property
    def replaces_mlp(self) -> bool:
        return self.hook_out.endswith("hook_mlp_out")

    def pre_activation_constant(
        self, dtype: torch.dtype, device: torch.device
    ) -> Float[Tensor, " d_sae"]:
        """Each latent's own constant: ``b_enc`` (minus ``W_enc^T b_dec`` if the SAE subtracts
        ``b_dec`` from its input), so that ``pre = W_enc^T x + constant``."""
        view = self.view
        b = view.b_enc.to(device=device, dtype=dtype)
        if view.subtract_b_dec:
            b = b - view.b_dec.to(device=device, dtype=dtype) @ view.W_enc.to(device, dtype)
        return b


def _named(dictionaries: DictionariesLike) -> list[tuple[str | None, Any]]:
    if isinstance(dictionaries, Mapping):
        return [(str(k), v) for k, v in dictionaries.items()]
    if isinstance(dictionaries, (str, bytes)) or not isinstance(dictionaries, Sequence):
        raise DePassInputError(
            "dictionaries must be a list of SAEs/transcoders or a {name: sae} mapping, got "
            f"{type(dictionaries).__name__}"
        )
    return [(None, d) for d in dictionaries]


def _site_name(view: SAEView, placement: Placement) -> str:
    if placement.kind == "output" and view.hook_out.endswith("hook_mlp_out"):
        return f"L{placement.layer}.mlp"
    if placement.kind == "output":
        return f"L{placement.layer}.attn_out"
    if placement.kind == "z":
        return f"L{placement.layer}.z"
    return view.name


def place_sites(adapter: ModelAdapter, dictionaries: DictionariesLike) -> list[Site]:
    """Check every dictionary against the model and order them as the forward pass meets them.

    Raises :class:`~depass_lens.errors.DePassInputError` for a dictionary whose hooks or widths do
    not match the model, non-finite weights, two dictionaries writing the same hook, or an empty
    list.
    """
    named = _named(dictionaries)
    if not named:
        raise DePassInputError("a feature graph needs at least one dictionary (transcoder or SAE)")
    sites: list[Site] = []
    claimed: dict[str, str] = {}
    expanded: list[tuple[str | None, Any, tuple[tuple[str, Tensor], ...]]] = []
    for given, sae in named:
        if isinstance(sae, CrossLayerTranscoder):
            expanded += _cross_layer_sites(sae, given)
        else:
            expanded.append((given, sae, ()))
    for given, sae, decoders in expanded:
        view = as_sae_view(sae, name=given)
        placement = place(view, adapter, "dictionary")
        name = given or _site_name(view, placement)
        if view.hook_out in claimed:
            raise DePassInputError(
                f"dictionaries {claimed[view.hook_out]!r} and {name!r} both write "
                f"{view.hook_out!r}: one module can be replaced by one dictionary only (its "
                "output would be counted twice)"
            )
        if any(s.name == name for s in sites):
            raise DePassInputError(f"two dictionaries are named {name!r}; give them distinct names")
        claimed[view.hook_out] = name
        sites.append(Site(name, view, placement, decoders))
    order = {name: i for i, name in enumerate(adapter.hook_names())}
    for site in sites:
        if site.hook_in not in order or site.hook_out not in order:
            raise DePassInputError(
                f"dictionary {site.name!r}: hooks {site.hook_in!r} / {site.hook_out!r} are not "
                "among the hooks this model's adapter runs"
            )
    sites.sort(key=lambda s: adapter.hook_position(s.hook_out))
    names = {s.name for s in sites}
    for site in sites:
        for target, W in site.decoders:
            if target not in names:
                raise DePassInputError(f"{site.name!r} decodes into {target!r}, which is no site")
            if W.shape != (site.view.d_sae, site.view.d_out):
                raise DePassInputError(
                    f"{site.name!r}: its decoder into {target!r} must be "
                    f"[{site.view.d_sae}, {site.view.d_out}], got {tuple(W.shape)}"
                )
    return sites


def _cross_layer_sites(
    clt: CrossLayerTranscoder, given: str | None
) -> list[tuple[str | None, Any, tuple[tuple[str, Tensor], ...]]]:
    """One site per layer of a cross-layer transcoder: its encoder, its own layer's decoder, and
    its decoders into every later layer's site."""
    prefix = given or "clt"
    out: list[tuple[str | None, Any, tuple[tuple[str, Tensor], ...]]] = []
    for layer in range(clt.n_layers):
        decoder = clt.W_dec[layer].detach()
        if not torch.isfinite(decoder).all():
            raise DePassInputError(f"cross-layer transcoder: W_dec[{layer}] contains NaN or inf")
        layer_view = SimpleNamespace(
            W_enc=clt.W_enc[layer],
            b_enc=clt.b_enc[layer],
            W_dec=decoder[:, 0],
            b_dec=clt.b_dec[layer],
            encode=partial(clt.encode_layer, layer),
            hook_name=clt.hook_in.format(layer=layer),
            hook_name_out=clt.hook_out.format(layer=layer),
        )
        later = tuple((f"L{layer + k}.{prefix}", decoder[:, k]) for k in range(1, decoder.shape[1]))
        out.append((f"L{layer}.{prefix}", layer_view, later))
    return out


__all__ = ["DictionariesLike", "Site", "place_sites"]
