"""A user's ``ActivationCache`` must be of the wrapped model, in its current state, on this input.

:class:`~depass_lens.frozen.FrozenActivations` checks a cache's entries, shape and token
embeddings. None of that sees a model changed after caching (a weight edited in place, a hook that
was on while caching), nor a cache computed with another attention mask: the frozen values are then
stale, and the decomposition sums to the stale cache at every hook after its start point, so the
losslessness check passes while the numbers explain another model. A change before the start point,
or in a query or key weight (the pattern is frozen), is not seen at all. One plain forward pass of
the model, compared with the cache at every residual-stream entry the cache holds, sees every one
of these, whatever the start point and whether ``check`` is on.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import ActivationCache

from depass_lens.adapters.base import ModelAdapter, Stage
from depass_lens.decomposition import relative_error, tolerance
from depass_lens.errors import CacheMismatchError

#: Rounding slack for rerunning the same model on the same input (deterministic on CPU; a GPU
#: may reorder a reduction).
SLACK = 10.0


def refuse_stale_cache(
    adapter: ModelAdapter,
    cache: ActivationCache,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
) -> None:
    """Raise :class:`CacheMismatchError` unless the model's own forward pass on ``tokens`` (with
    ``attention_mask``) reproduces the cache's residual stream, naming the first hook that
    differs. The cache must hold the last layer's ``hook_resid_post``."""
    last = adapter.resid_hook(adapter.n_layers - 1, "post")
    if last not in cache.cache_dict:
        raise CacheMismatchError(
            f"the ActivationCache lacks {last!r}, which DePass compares with the model to make "
            "sure the cache is of it in its current state; cache it (names_filter=None caches "
            "everything) or let DePass run the model"
        )
    stages: tuple[Stage, ...] = ("pre", "mid", "post") if adapter.has_resid_mid else ("pre", "post")
    every = [
        adapter.resid_hook(layer, stage) for layer in range(adapter.n_layers) for stage in stages
    ]
    names = [name for name in every if name in cache.cache_dict]
    mismatches: list[tuple[str, float, float]] = []

    def compare(name: str):
        def hook(value: Tensor, hook) -> None:
            cached = cache[name]
            if mismatches or cached.shape != value.shape:
                if not mismatches:
                    mismatches.append((name, float("inf"), 0.0))
                return
            limit = SLACK * tolerance(adapter.precision(value.dtype))
            err = relative_error(value.detach().unsqueeze(1), cached.to(value.device))
            if not err <= limit:
                mismatches.append((name, err, limit))

        return hook

    with torch.no_grad(), adapter.hooks([(name, compare(name)) for name in names]):
        adapter.stream(tokens, attention_mask, adapter.n_layers)
    if mismatches:
        name, err, limit = mismatches[0]
        raise CacheMismatchError(
            f"the ActivationCache does not match the model: at {name!r} the model's own forward "
            f"pass differs from the cache by {err:.3g} (relative; tolerance {limit:.1g}). Was "
            "the model changed after the cache was computed (weights edited, a hook on while "
            "caching), or is the cache from another prompt or attention mask? Recompute the "
            "cache, or let DePass run the model (omit cache=)"
        )
