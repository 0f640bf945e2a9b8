"""Forward hooks that remember what flows through a hook point (live, or detached: frozen)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.saved_tensors import recompute_when_saved

HookFn = Callable[..., Tensor | None]


def store(seen: dict[str, Tensor], key: str, frozen: bool = False) -> HookFn:
    """A hook that keeps its value in ``seen[key]`` and passes it on; ``frozen`` detaches it
    first, so nothing upstream of the hook receives gradient through it."""

    def fn(value: Tensor, hook) -> Tensor:
        seen[key] = value.detach() if frozen else value
        return seen[key]

    return fn


def cut(value: Tensor, hook) -> Tensor:
    """A hook that passes its value on with no gradient path behind it."""
    return value.detach()


def mlp_cut_hooks(gated: bool, layer: int) -> list[tuple[str, HookFn]]:
    """Hooks cutting a dense MLP's pre-activations: an MLP a dictionary replaces (feature
    graphs) then leaves nothing of itself on the autograd graph."""
    names = ["hook_pre", "hook_pre_linear"] if gated else ["hook_pre"]
    return [(f"blocks.{layer}.mlp.{name}", cut) for name in names]


def pattern_of(
    scores: Float[Tensor, "batch head query key"],
) -> Float[Tensor, "batch head query key"]:
    """The attention pattern TransformerLens computes from (masked) scores: a softmax over the
    keys, with rows that see no key (all ``-inf``) set to zero instead of NaN."""
    pattern = torch.softmax(scores, dim=-1)
    return pattern.nan_to_num_(nan=0.0)  # in place: a softmax is finite or NaN, never infinite


def store_frozen_pattern(
    seen: dict[str, Tensor], key: str, scores_key: str, shared_rows: bool = False
) -> HookFn:
    """:func:`store` for ``hook_pattern`` (frozen), where ``seen[scores_key]`` holds the frozen
    scores it was computed from: autograd may then rebuild the pattern from them layer by layer in
    the backward pass instead of keeping it
    (:func:`~depass_lens.saved_tensors.recompute_when_saved`; checked bit for bit, kept where
    the model computes it otherwise). ``shared_rows`` (every row a copy of one prompt): the first
    row, expanded, flows on instead; nothing is rebuilt."""

    def fn(value: Tensor, hook) -> Tensor:
        if shared_rows:
            seen[key] = one_row_shared(value)
            return seen[key]
        pattern = value.detach()
        scores = seen[scores_key]
        seen[key] = recompute_when_saved(pattern, partial(pattern_of, scores))
        return pattern

    return fn


def first_copy(value: Tensor, shared_rows: bool) -> Tensor:
    """With ``shared_rows`` (every row a copy of one prompt), the first row: what the pattern side
    freezes is then formed once, for all copies."""
    return value[:1] if shared_rows and value.shape[0] > 1 else value


def one_row_shared(value: Tensor) -> Tensor:
    """A frozen tensor whose rows are copies of one prompt's, as its first row expanded: what
    autograd keeps of it (a pattern, for ``z = A v``) is then one row, not one per copy."""
    value = value.detach()
    if value.shape[0] <= 1 or value.stride(0) == 0:
        return value
    return value[:1].clone().expand_as(value)
