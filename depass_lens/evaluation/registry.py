"""Registries of attribution methods, one signature per level, so runs compare like with like.

Token methods::

    fn(model, tokens, metric, *, attention_mask=None, **opts) -> Float[Tensor, "batch pos"]

Component methods (``level``: "heads", "neurons" or ("neurons", layer); see ``levels``)::

    fn(model, tokens, metric, *, level, corrupted_tokens=None, reference_tokens=None,
       attention_mask=None, **opts) -> Float[Tensor, "batch n_comp"]

Subspace methods (rank input tokens for a probe reading; see ``subspace.Probe``)::

    fn(model, tokens, probe, *, attention_mask=None, **opts) -> Float[Tensor, "batch pos"]

A component method also has an orientation ``sign``: ``sign * score`` is an *importance* (high =
the component pushes the metric up). Shares and gradient x activation are importances (``+1``);
ablation and patching effects ``metric(ablated) - metric(clean)`` are changes (``-1``). Methods
must raise ``ValueError`` when an input they need (e.g. ``corrupted_tokens``) is missing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.levels import Level
from depass_lens.evaluation.metrics import Metric

if TYPE_CHECKING:  # subspace.py registers its methods here
    from depass_lens.evaluation.subspace import Probe

TokenMethod = Callable[..., Float[Tensor, "batch pos"]]
ComponentMethod = Callable[..., Float[Tensor, "batch n_comp"]]
SubspaceMethod = Callable[..., Float[Tensor, "batch pos"]]


@dataclass(frozen=True)
class TokenTask:
    """What every token method is asked: score each token of ``tokens`` for ``metric``."""

    model: TLModel
    tokens: Int[Tensor, "batch pos"]
    metric: Metric
    attention_mask: Tensor | None = None


def token_method(fn: Callable[..., Float[Tensor, "batch pos"]]) -> TokenMethod:
    """``fn(task: TokenTask, **options)`` behind the registry's token signature
    ``(model, tokens, metric, *, attention_mask=None, **options)``."""

    def method(
        model: TLModel,
        tokens: Int[Tensor, "batch pos"],
        metric: Metric,
        *,
        attention_mask: Tensor | None = None,
        **options: Any,
    ) -> Float[Tensor, "batch pos"]:
        return fn(TokenTask(model, tokens, metric, attention_mask), **options)

    return _behind(method, fn)


@dataclass(frozen=True)
class SubspaceTask:
    """What every subspace method is asked: score each token of ``tokens`` for the reading of
    ``probe``."""

    model: TLModel
    tokens: Int[Tensor, "batch pos"]
    probe: Probe
    attention_mask: Tensor | None = None


def subspace_method(fn: Callable[..., Float[Tensor, "batch pos"]]) -> SubspaceMethod:
    """``fn(task: SubspaceTask, **options)`` behind the registry's subspace signature
    ``(model, tokens, probe, *, attention_mask=None, **options)``."""

    def method(
        model: TLModel,
        tokens: Int[Tensor, "batch pos"],
        probe: Probe,
        *,
        attention_mask: Tensor | None = None,
        **options: Any,
    ) -> Float[Tensor, "batch pos"]:
        return fn(SubspaceTask(model, tokens, probe, attention_mask), **options)

    return _behind(method, fn)


def _behind(method: Callable, fn: Callable) -> Callable:
    """``method`` named and documented as ``fn``, with its own (the registry's) signature."""
    functools.update_wrapper(method, fn, updated=())
    del method.__wrapped__  # type: ignore[attr-defined]
    return method


@dataclass(frozen=True)
class ComponentTask:
    """What every component method is asked: score each component of ``level`` for ``metric``
    on ``tokens`` (``corrupted_tokens`` / ``reference_tokens`` where the method needs them)."""

    model: TLModel
    tokens: Int[Tensor, "batch pos"]
    metric: Metric
    level: Level
    corrupted_tokens: Tensor | None = None
    reference_tokens: Tensor | None = None
    attention_mask: Tensor | None = None


def component_method(
    fn: Callable[..., Float[Tensor, "batch n_comp"]],
) -> ComponentMethod:
    """``fn(task: ComponentTask, **options)`` behind the registry's component signature
    ``(model, tokens, metric, *, level, corrupted_tokens=None, reference_tokens=None,
    attention_mask=None, **options)``: the convention is written once, here."""

    def method(
        model: TLModel,
        tokens: Int[Tensor, "batch pos"],
        metric: Metric,
        *,
        level: Level,
        corrupted_tokens: Tensor | None = None,
        reference_tokens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **options: Any,
    ) -> Float[Tensor, "batch n_comp"]:
        task = ComponentTask(
            model, tokens, metric, level, corrupted_tokens, reference_tokens, attention_mask
        )
        return fn(task, **options)

    return _behind(method, fn)


TOKEN_METHODS: dict[str, TokenMethod] = {}
COMPONENT_METHODS: dict[str, ComponentMethod] = {}
SUBSPACE_METHODS: dict[str, SubspaceMethod] = {}
COMPONENT_SIGNS: dict[str, int] = {}


def _register(table: dict[str, Any], name: str, fn: Callable, overwrite: bool) -> bool:
    if not callable(fn):
        raise TypeError(f"method {name!r} must be callable")
    if name in table and not overwrite:
        return False
    table[name] = fn
    return True


def register_token_method(name: str, fn: TokenMethod, *, overwrite: bool = True) -> None:
    """Add (or replace) a token-level method."""
    _register(TOKEN_METHODS, name, fn, overwrite)


def register_component_method(
    name: str, fn: ComponentMethod, *, sign: int = 1, overwrite: bool = True
) -> None:
    """Add (or replace) a component-level method; ``sign`` orients its scores as importance."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, not {sign}")
    if _register(COMPONENT_METHODS, name, fn, overwrite):
        COMPONENT_SIGNS[name] = sign


def register_subspace_method(name: str, fn: SubspaceMethod, *, overwrite: bool = True) -> None:
    """Add (or replace) a method ranking input tokens for a probe reading."""
    _register(SUBSPACE_METHODS, name, fn, overwrite)


def component_sign(name: str) -> int:
    """``+1`` if the method's scores are importances, ``-1`` if they are change effects."""
    return COMPONENT_SIGNS.get(name, 1)
