"""The real forward pass's nonlinear quantities, read from an ``ActivationCache`` and checked.

DePass freezes norm scales, attention patterns and MLP activations at their real values. They come
from one ordinary ``run_with_cache`` (or a cache the user already has); this module says which
entries are needed, computes them when no cache is given, and refuses caches that do not fit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache

from depass_lens.adapter import ModelAdapter
from depass_lens.adapters.base import parameter_versions
from depass_lens.errors import CacheMismatchError, DePassInputError


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
    wanted = _wanted(adapter, extra_names)
    with torch.no_grad():
        _, cache = adapter.model.run_with_cache(
            tokens,
            attention_mask=attention_mask,
            names_filter=lambda name: name in wanted,
        )
    return cache


def _wanted(adapter: ModelAdapter, extra_names: Iterable[str]) -> set[str]:
    return set(adapter.frozen_hook_names()) | set(extra_names) | {"hook_embed"}


def frozen_activations(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    extra_names: Iterable[str] = (),
) -> dict[str, Tensor]:
    """:func:`run_frozen_cache` as a dict with one name per tensor. A bridge caches some hooks
    under alias names too; the name asked for is kept, so that dropping it frees the tensor."""
    extra_names = list(extra_names)
    cache = run_frozen_cache(adapter, tokens, attention_mask, extra_names)
    wanted = _wanted(adapter, extra_names)
    acts: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name in sorted(cache.cache_dict, key=lambda name: name not in wanted):  # asked first
        value = cache[name]
        if id(value) not in seen:
            acts[name] = value
            seen.add(id(value))
    return acts


class FrozenActivations:
    """Validated, read-only access to the cache entries forward-mode propagation needs.

    Args:
        adapter: the wrapped model.
        cache: an ``ActivationCache`` of ``adapter.model`` on ``tokens``.
        tokens: the input the cache must have been computed on.
        attention_mask: the padding mask it was computed with (to rerun it on a broken state).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: ActivationCache,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ):
        self.adapter = adapter
        self.cache = cache
        self.tokens = tokens
        validate_cache(adapter, cache, tokens, attention_mask)

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
    adapter: ModelAdapter,
    cache: ActivationCache,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> None:
    """Raise :class:`CacheMismatchError` unless ``cache`` can serve DePass for ``tokens``.

    A broken model state (NaN or inf in weights or activations) raises
    :class:`~depass_lens.errors.DePassInputError` naming where it first appears.
    """
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
    refuse_non_finite(adapter, cache.cache_dict, tokens, attention_mask, from_cache=True)
    with torch.no_grad():
        expected = adapter.embed(tokens.to(adapter.device))
    if not torch.allclose(embed.to(expected.dtype), expected, rtol=1e-4, atol=1e-6):
        raise CacheMismatchError(
            "the ActivationCache's token embeddings do not match these tokens (or the embedding "
            "weights changed since caching): it was computed on another prompt or model state"
        )


# ------------------------------------------------------------------------ broken model states
def is_finite_activation(name: str, value: Tensor) -> bool:
    """No NaN or inf, except ``-inf`` in attention scores (TransformerLens's masked entries).

    Read from the extremes (NaN propagates through ``amax``/``amin``), two reductions without a
    boolean tensor the size of the activation: about 6x cheaper than ``isfinite(...).all()``,
    which every DePass call pays on every cached activation."""
    if value.numel() == 0:
        return True
    top = value.amax()
    if name.endswith("attn_scores"):  # -inf is a mask; NaN or +inf is not
        return not bool(torch.isnan(top) | (top == torch.inf))
    return bool(torch.isfinite(top) & torch.isfinite(value.amin()))


def _what(value: Tensor) -> str:
    return "NaN" if bool(torch.isnan(value).any()) else "inf"


_WEIGHTS_SEEN: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[str]]] = (
    weakref.WeakKeyDictionary()
)


def non_finite_weights(
    model: nn.Module, named: Callable[[], Iterable[tuple[str, Tensor]]] | None = None
) -> list[str]:
    """The model's parameters holding NaN or inf, e.g. ``["blocks.0.mlp.W_in (NaN)"]``.

    ``named`` lists the weights by their TransformerLens names (default: the model's
    ``named_parameters``; an adapter's ``named_weights``). Scanned once, then again only when a
    parameter changes (its storage or version counter), so repeated calls cost nothing on a
    healthy model.
    """
    params = list((named or model.named_parameters)())
    key = parameter_versions(p for _, p in params)
    seen = _WEIGHTS_SEEN.get(model)
    if seen is not None and seen[0] == key:
        return seen[1]
    with torch.no_grad():
        bad = [f"{name} ({_what(p)})" for name, p in params if not bool(torch.isfinite(p).all())]
    _WEIGHTS_SEEN[model] = (key, bad)
    return bad


def first_non_finite_hook(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
) -> tuple[str, str] | None:
    """Run the model once with a check on every hook, in forward order: the first hook whose value
    holds NaN or inf, and which (``"NaN"``/``"inf"``); ``None`` if the whole pass is finite.

    Only called once something was found non-finite, so the normal path never pays for it.
    DePass's entry points refuse a model carrying hooks before they get here
    (:meth:`~depass_lens.adapters.base.ModelAdapter.refuse_foreign_hooks`), so this is the
    model's own pass; a direct caller's hooks would run first, and a value they break is seen.
    """
    found: list[tuple[str, str]] = []

    def record(value: Tensor, hook) -> None:
        if not found and isinstance(value, Tensor) and not is_finite_activation(hook.name, value):
            found.append((hook.name, _what(value)))

    with torch.no_grad():
        model.run_with_hooks(  # type: ignore[operator]
            tokens,
            attention_mask=attention_mask,
            return_type=None,
            fwd_hooks=[(lambda name: True, record)],
        )
    return found[0] if found else None


def refuse_non_finite(
    adapter: ModelAdapter,
    activations: Mapping[str, Tensor],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    from_cache: bool = False,
) -> None:
    """Refuse a broken model state: NaN or inf in the weights or in the real activations.

    DePass decomposes the real activations, so a non-finite one leaves nothing to decompose (and
    would give NaN scores silently). The error names the first hook, in forward order, where the
    model's own pass goes non-finite, and any non-finite weight. Where the model's pass is finite
    but ``activations`` are not, the given activations are at fault (``from_cache``: a user's
    cache, :class:`CacheMismatchError`).
    """
    weights = non_finite_weights(adapter.model, adapter.named_weights)
    entries = [name for name, value in activations.items() if not is_finite_activation(name, value)]
    if not weights and not entries:
        return
    first = first_non_finite_hook(adapter.model, tokens, attention_mask)
    if first is None and not weights:
        what = "cache entry" if from_cache else "activation"
        error = CacheMismatchError if from_cache else DePassInputError
        raise error(
            f"{what} {entries[0]!r} contains NaN or inf, but the model's own forward pass on these "
            "tokens is finite: the activations do not come from this model state"
        )
    parts = []
    if first is not None:
        parts.append(f"{first[1]} first appears at hook {first[0]!r}")
    if weights:
        reach = "" if first is not None else " (they reach no hook on this input)"
        parts.append(f"non-finite weights: {', '.join(weights[:4])}{reach}")
    raise DePassInputError(
        "the model's state is broken: " + "; ".join(parts) + ". DePass decomposes the real "
        "forward pass, so there is nothing finite to decompose; fix the weights or the hook that "
        "writes NaN/inf"
    )
