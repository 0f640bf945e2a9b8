"""The real forward pass's nonlinear quantities, read from an ``ActivationCache`` and checked.

DePass freezes norm scales, attention patterns and MLP activations at their real values. They come
from one ordinary ``run_with_cache`` (or a cache the user already has); this module says which
entries are needed, computes them when no cache is given, and refuses caches that do not fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from depass_lens.adapter import ModelAdapter
from depass_lens.errors import CacheMismatchError


class Activations(Protocol):
    """Real activations by hook name: an ``ActivationCache``, a dict, :class:`FrozenActivations`."""

    def __getitem__(self, name: str, /) -> Tensor: ...


def run_frozen_cache(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    extra_names: Iterable[str] = (),
) -> ActivationCache:
    """One plain forward pass caching only what DePass reads (frozen values + source states)."""
    wanted = set(adapter.frozen_hook_names()) | set(extra_names) | {"hook_embed"}
    with torch.no_grad():
        _, cache = adapter.model.run_with_cache(
            tokens,
            attention_mask=attention_mask,
            names_filter=lambda name: name in wanted,
        )
    return cache


class FrozenActivations:
    """Validated, read-only access to the cache entries forward-mode propagation needs.

    Args:
        adapter: the wrapped model.
        cache: an ``ActivationCache`` of ``adapter.model`` on ``tokens``.
        tokens: the input the cache must have been computed on.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: ActivationCache,
        tokens: Int[Tensor, "batch pos"],
    ):
        self.adapter = adapter
        self.cache = cache
        self.tokens = tokens
        validate_cache(adapter, cache, tokens)

    def __getitem__(self, name: str) -> Tensor:
        return self.cache[name]

    def __contains__(self, name: str) -> bool:
        return name in self.cache.cache_dict

    def scale(self, hook: str | None) -> Float[Tensor, "batch pos 1"] | None:
        """A norm's frozen scale, with any head axis (split-QKV models) dropped."""
        if hook is None:
            return None
        scale = self.cache[hook]
        if scale.ndim == 4:  # use_split_qkv_input / use_attn_in: [batch pos head 1], heads agree
            scale = scale[:, :, 0]
        return scale

    def pattern(self, layer: int) -> Float[Tensor, "batch head query key"]:
        return self.cache[f"blocks.{layer}.attn.hook_pattern"]

    def mlp(self, layer: int, name: str) -> Float[Tensor, "batch pos d_mlp"]:
        return self.cache[f"blocks.{layer}.mlp.hook_{name}"]

    def routing(self, layer: int) -> Float[Tensor, "batch pos expert"]:
        """Each expert's frozen mixing weight per position (zero where it was not selected)."""
        moe = self.adapter.moe(layer)
        batch, n_pos = self.tokens.shape
        probs = self.cache[moe.weights_hook].reshape(batch, n_pos, -1)
        top, index = probs.topk(moe.experts_per_token, dim=-1)
        if moe.renormalise:
            top = top / top.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, index, top)


def validate_cache(
    adapter: ModelAdapter, cache: ActivationCache, tokens: Int[Tensor, "batch pos"]
) -> None:
    """Raise :class:`CacheMismatchError` unless ``cache`` can serve DePass for ``tokens``."""
    model_of_cache = getattr(cache, "model", None)
    if model_of_cache is not None and model_of_cache is not adapter.model:
        raise CacheMismatchError(
            "the ActivationCache was computed by a different model object than the one DePass "
            "wraps; run `model.run_with_cache(tokens)` on the wrapped model"
        )
    missing = [n for n in adapter.frozen_hook_names() if n not in cache.cache_dict]
    if missing:
        raise CacheMismatchError(
            f"the ActivationCache lacks {len(missing)} entries DePass needs, e.g. {missing[:4]}; "
            "cache them (names_filter=None caches everything) or let DePass run the model"
        )
    if "hook_embed" not in cache.cache_dict:
        raise CacheMismatchError("the ActivationCache lacks 'hook_embed'; it is used to check it")
    embed = cache["hook_embed"]
    if tuple(embed.shape[:2]) != tuple(tokens.shape):
        raise CacheMismatchError(
            f"the ActivationCache is for input of shape {tuple(embed.shape[:2])} but the tokens "
            f"have shape {tuple(tokens.shape)}; it was computed on another prompt"
        )
    with torch.no_grad():
        expected = adapter.embed(tokens.to(adapter.device))
    if not torch.allclose(embed.to(expected.dtype), expected, rtol=1e-4, atol=1e-6):
        raise CacheMismatchError(
            "the ActivationCache's token embeddings do not match these tokens (or the embedding "
            "weights changed since caching): it was computed on another prompt or model state"
        )
    for name in adapter.frozen_hook_names():
        value = cache[name]
        if not torch.isfinite(value).all():
            raise CacheMismatchError(
                f"cache entry {name!r} contains NaN or inf: the forward pass itself overflowed, so "
                "there is nothing finite to decompose"
            )
