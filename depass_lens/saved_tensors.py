"""What autograd keeps of a linearised forward: parameters and recomputable activations are
stored as recipes, not as copies.

TransformerLens 3's components multiply by rearranged copies of their weights
(``F.linear(x, W_in.T.contiguous())``, ``einops.rearrange(W_Q, "h m e -> (h e) m")``), and a
half-precision model's weights are cast as DePass uses them: a fresh tensor per weight and
forward, which autograd keeps for the backward pass. Over a linearised forward that is a second
copy of every weight for the whole pass (5.6 GiB for a 1.5B-parameter model in float32). Inside
:func:`lean_saved_tensors`, a saved tensor made from one parameter by data movement only
(transpose, permute, reshape, expand, clone, dtype or device cast) is stored as that parameter
and the steps that made it, and rebuilt when the backward pass reads it: one weight's copy at a
time, for as long as its layer's backward needs it.

Activations work the same way when their maker says how to rebuild them
(:func:`recompute_when_saved`): a frozen attention pattern is ``softmax`` of the frozen scores
that the QK-aware splits keep anyway, so the ``query x key`` pattern TransformerLens's ``pattern
@ v`` saves is rebuilt layer by layer in the backward pass instead of kept for all layers.

Every recipe is checked to rebuild its tensor bit for bit when it is stored (except an activation
that is its recipe's own output, unchanged since), and a tensor it does not reproduce is kept as it
is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Saved tensors smaller than this (elements) are kept as they are: not worth a recipe.
MIN_ELEMENTS = 1 << 14
#: Autograd nodes that only move or cast data, by name, and how each changes the shape.
_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
_SAME_SHAPE = ("CloneBackward0", "ToCopyBackward0", "AliasBackward0")
_MOVES = (
    *_RESHAPES,
    *_SAME_SHAPE,
    "PermuteBackward0",
    "TransposeBackward0",
    "TBackward0",
    "UnsqueezeBackward0",
    "ExpandBackward0",  # with unsqueeze: repeat_interleave (grouped keys' weights per head)
)


@dataclass(frozen=True)
class ParameterRecipe:
    """A tensor as ``steps`` applied to ``parameter`` (then cast to ``dtype`` on ``device``)."""

    parameter: Tensor
    steps: tuple[tuple[str, tuple[int, ...]], ...]  # in forward order
    dtype: torch.dtype
    device: torch.device
    contiguous: bool
    version: int  # the parameter's in-place version when the copy was made

    def rebuild(self) -> Tensor:
        if self.parameter._version != self.version:  # what autograd refuses for saved tensors
            raise RuntimeError(
                f"a parameter of shape {tuple(self.parameter.shape)} was modified in place "
                "between the forward pass and its backward pass"
            )
        with torch.no_grad():
            x = self.parameter.detach()
            for op, args in self.steps:
                if op == "permute":
                    x = x.permute(args)
                elif op == "transpose":
                    x = x.transpose(*args)
                elif op == "expand":
                    x = x.expand(args)
                else:
                    x = x.reshape(args)
            x = x.to(device=self.device, dtype=self.dtype)
            return x.contiguous() if self.contiguous else x


def _dim(saved: int, ndim: int) -> int:
    """A dimension as autograd saved it (a negative one as an unsigned 64-bit integer)."""
    if saved >= 1 << 63:
        saved -= 1 << 64
    return saved % ndim


def recipe_for(saved: Tensor) -> ParameterRecipe | None:
    """How ``saved`` was made from one parameter by data movement, or ``None`` (anything else,
    a view of the parameter itself, or a small tensor)."""
    fn: Any = saved.grad_fn
    if fn is None or saved.numel() < MIN_ELEMENTS:
        return None
    steps: list[tuple[str, tuple[int, ...]]] = []
    shape = tuple(saved.shape)  # the output shape of the node being read
    while type(fn).__name__ != "AccumulateGrad":
        name = type(fn).__name__
        if name not in _MOVES:
            return None
        if name in _RESHAPES:
            steps.append(("reshape", shape))
            shape = tuple(fn._saved_self_sym_sizes)
        elif name == "UnsqueezeBackward0":
            steps.append(("reshape", shape))
            dim = _dim(fn._saved_dim, len(shape))
            shape = shape[:dim] + shape[dim + 1 :]
        elif name == "ExpandBackward0":
            steps.append(("expand", shape))
            shape = tuple(fn._saved_self_sym_sizes)
        elif name == "PermuteBackward0":
            dims = tuple(_dim(d, len(shape)) for d in fn._saved_dims)
            steps.append(("permute", dims))
            before = [0] * len(shape)
            for out_dim, in_dim in enumerate(dims):
                before[in_dim] = shape[out_dim]
            shape = tuple(before)
        elif name in ("TransposeBackward0", "TBackward0"):
            dims = (fn._saved_dim0, fn._saved_dim1) if name == "TransposeBackward0" else (0, 1)
            d0, d1 = (_dim(d, len(shape)) for d in dims)
            steps.append(("transpose", (d0, d1)))
            swapped = list(shape)
            swapped[d0], swapped[d1] = shape[d1], shape[d0]
            shape = tuple(swapped)
        parents = [f for f, _ in fn.next_functions if f is not None]
        if len(parents) != 1:
            return None
        fn = parents[0]
    parameter = fn.variable
    if not isinstance(parameter, torch.nn.Parameter):
        return None  # another leaf (an input): its copies are the caller's business
    if parameter.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr():
        return None  # a view of the parameter costs nothing to keep
    recipe = ParameterRecipe(
        parameter,
        tuple(reversed(steps)),
        saved.dtype,
        saved.device,
        saved.is_contiguous(),
        parameter._version,
    )
    try:
        rebuilt = recipe.rebuild()
    except RuntimeError:
        return None
    if rebuilt.shape != saved.shape or not torch.equal(rebuilt, saved.detach()):
        return None
    return recipe


@dataclass(frozen=True)
class ActivationRecipe:
    """A saved tensor as a view (``size``, ``stride``, ``offset``) of what ``make`` rebuilds."""

    make: Callable[[], Tensor]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def rebuild(self) -> Tensor:
        with torch.no_grad():
            return self.make().as_strided(self.size, self.stride, self.offset)


#: Storage address -> (the registered tensor, weakly; how to rebuild it; if it is that rebuild's
#: own output, its in-place version then), inside the context.
_recomputable: dict[int, tuple[weakref.ref, Callable[[], Tensor], int | None]] | None = None


def recompute_when_saved(tensor: Tensor, make: Callable[[], Tensor], made: bool = False) -> Tensor:
    """Let autograd store ``tensor`` (contiguous, not requiring grad), or any view of it, as
    ``make`` (which rebuilds it bit for bit from what the caller keeps anyway) while
    :func:`lean_saved_tensors` is active; a no-op outside it. Returns ``tensor``.

    ``made``: ``tensor`` is ``make()``'s own output, so the bit-for-bit check at storing time
    (one more call of ``make``) is skipped; anything else is checked."""
    if _recomputable is not None and tensor.is_contiguous() and tensor.storage_offset() == 0:
        version = tensor._version if made else None
        _recomputable[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), make, version)
    return tensor


def _activation_recipe(saved: Tensor) -> ActivationRecipe | None:
    if _recomputable is None or saved.numel() < MIN_ELEMENTS:
        return None
    address = saved.untyped_storage().data_ptr()
    entry = _recomputable.get(address)
    if entry is None:
        return None
    base = entry[0]()
    if base is None or base.untyped_storage().data_ptr() != address:
        del _recomputable[address]  # freed, and its memory reused
        return None
    recipe = ActivationRecipe(
        entry[1], tuple(saved.size()), saved.stride(), int(saved.storage_offset())
    )
    if entry[2] is not None and base._version == entry[2]:  # ``make``'s output, untouched since
        return recipe
    rebuilt = recipe.rebuild()
    if rebuilt.dtype != saved.dtype or not torch.equal(rebuilt, saved.detach()):
        return None
    return recipe


Recipe = ParameterRecipe | ActivationRecipe


def _pack(saved: Tensor) -> Tensor | Recipe:
    # Anything else is kept detached: handing autograd back the tensor itself ties a saved
    # output to its own grad_fn, a reference cycle no collector sees (the graph leaks).
    return recipe_for(saved) or _activation_recipe(saved) or saved.detach()


def _unpack(stored: Tensor | Recipe) -> Tensor:
    return stored if isinstance(stored, Tensor) else stored.rebuild()


@contextmanager
def lean_saved_tensors() -> Iterator[None]:
    """Within: autograd stores parameter copies and registered activations as recipes (see the
    module docstring)."""
    global _recomputable
    outer = _recomputable
    _recomputable = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _recomputable = outer


__all__ = [
    "MIN_ELEMENTS",
    "ActivationRecipe",
    "ParameterRecipe",
    "lean_saved_tensors",
    "recipe_for",
    "recompute_when_saved",
]
