"""Per-node inputs on a ``TransformerBridge`` (a copy of the stream per head, one for the MLP).

Circuit graphs and their patching check need what TransformerLens 3's ``use_split_qkv_input``
gives a ``HookedTransformer``: every head its own copy of the stream for its queries, keys and
values (``blocks.L.hook_q_input`` ... ``[batch, pos, head, d_model]``), normalised per head
through ``ln1`` (so ``ln1.hook_scale`` fires ``[batch, pos, head, 1]`` and a hook can freeze
it). A bridge offers split inputs only on some attention classes (not the ``AttentionBridge`` of
``boot_native`` models), and normalises the copies through the wrapped norm, past
``ln1.hook_scale``. So here the copies are made outside the attention module:

* ``hook_resid_pre`` is kept as it flows on (after every other hook on it);
* at ``attn.hook_q``/``hook_k``/``hook_v`` each head's projection is recomputed from its own
  copy: ``ln1`` (its scale through the bridge's ``ln1.hook_scale``), then the head's slice of
  ``W_Q``/``W_K``/``W_V`` and bias. An untouched head keeps the model's own value exactly, with
  the gradient of its copy (``value.detach() + (y - y.detach())``); a head whose copy a hook
  changed takes the recomputed value, as a ``HookedTransformer`` would compute it.

The shared ``ln1`` output then reaches nothing that carries a gradient, so the gradient at each
copy is the gradient through that one head's input: what a graph edge needs.

The MLP side differs too: a bridge's ``hook_resid_mid`` is ``ln2``'s input, the MLP's branch
only, while the residual sum reads the unhooked stream. Inside the split, ``hook_resid_mid``
and ``hook_mlp_in`` are the adapter's own points, fired in that order on the MLP branch's input
``m`` (``s = resid_mid(m)``, the MLP reads ``mlp_in(s)``), and the block's output gets
``+ (s - m)``: zero in value while no hook changes ``s``, and it routes the residual path through
``s``, so ``hook_resid_mid`` is the stream both branches read, as on a ``HookedTransformer``
(parallel blocks have no ``resid_mid``; their MLP input is a copy of ``resid_pre``). Grouped-query
attention is refused: a bridge computes one key and value per key/value head, so no hook can
give a query head keys of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapters.base import NormWeights
from depass_lens.errors import UnsupportedModelError

SIDES = ("q", "k", "v")
HookFn = Callable[..., Any]


#: A side's weight ``[head d_model d_head]`` and bias ``[head d_head]``.
Projection = tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head"]]


def _norm_points(points: dict[str, Any], norm: NormWeights | None) -> tuple[Any, Any]:
    """The bridge's ``hook_scale`` and ``hook_normalized`` points of ``norm`` (``None``: absent)."""
    if norm is None or norm.scale_hook is None:
        return None, None
    normalized = norm.scale_hook.removesuffix(".hook_scale") + ".hook_normalized"
    return points.get(norm.scale_hook), points.get(normalized)


def input_hook_name(layer: int, side: str) -> str:
    """TransformerLens 3's name for one side's per-head input of ``layer``."""
    return f"blocks.{layer}.hook_{side}_input"


class SplitInputs:
    """The per-node input hook points of one bridge and the hooks that feed them.

    ``points`` is the bridge's ``hook_dict``, ``norms[layer]`` that layer's ``ln1`` (``None``: no
    norm), ``projections[layer]`` its query, key and value weights and biases (``{"q": (W_Q [head
    d_model d_head], b_Q [head d_head]), ...}``, read once by the adapter), ``eps`` the norms'
    epsilon, ``mlp_branch[layer]`` the bridge hook on its MLP branch's input (``None``: no MLP)
    and ``parallel`` whether the MLP reads ``resid_pre`` (no ``resid_mid``). ``per_head=False``
    splits the MLP's input only (heads keep the shared stream)."""

    def __init__(
        self,
        points: dict[str, Any],
        norms: list[NormWeights | None],
        projections: list[dict[str, Projection]],
        eps: float,
        mlp_branch: list[str | None],
        parallel: bool,
        per_head: bool = True,
    ):
        from transformer_lens.hook_points import HookPoint

        self.norms = norms
        self.projections = projections
        self._norm_points = [_norm_points(points, norm) for norm in norms]
        self.eps = eps
        self.mlp_branch = mlp_branch
        self.parallel = parallel
        self.per_head = per_head
        self.points: dict[str, Any] = {}
        names = []
        if per_head:
            names = [input_hook_name(layer, side) for layer in range(len(norms)) for side in SIDES]
        for layer, branch in enumerate(mlp_branch):
            if branch is not None:
                names.append(f"blocks.{layer}.hook_mlp_in")
                if not parallel:
                    names.append(f"blocks.{layer}.hook_resid_mid")
        for name in names:
            point = HookPoint()
            point.name = name
            self.points[name] = point
        self._resid: dict[int, Tensor] = {}
        self._mid_moved: dict[int, Tensor] = {}  # s - m of each layer (see the module docstring)

    @contextmanager
    def attached(self, fwd_hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
        """Put ``fwd_hooks`` on the per-head input points for the duration of the block."""
        try:
            for name, fn in fwd_hooks:
                self.points[name].add_hook(fn, dir="fwd")
            yield
        finally:
            for point in self.points.values():
                point.remove_hooks("fwd")
            self._resid.clear()
            self._mid_moved.clear()

    def around(self, fwd_hooks: list[tuple[Any, HookFn]]) -> list[tuple[Any, HookFn]]:
        """``fwd_hooks`` with the splitting hooks added: each projection is recomputed before any
        other hook on it sees it, and the stream is kept after every other hook on it."""
        before: list[tuple[Any, HookFn]] = []
        after: list[tuple[Any, HookFn]] = []
        for layer in range(len(self.norms)):
            if self.per_head:
                after.append((f"blocks.{layer}.hook_resid_pre", self._keep(layer)))
                for side in SIDES:
                    before.append((f"blocks.{layer}.attn.hook_{side}", self._project(layer, side)))
            branch = self.mlp_branch[layer]
            if branch is not None:
                before.append((branch, self._mlp_input(layer)))
                if not self.parallel:
                    before.append((f"blocks.{layer}.hook_resid_post", self._reroute(layer)))
        return before + list(fwd_hooks) + after

    def _mlp_input(self, layer: int) -> HookFn:
        mlp_in = self.points[f"blocks.{layer}.hook_mlp_in"]
        mid = None if self.parallel else self.points[f"blocks.{layer}.hook_resid_mid"]

        def mlp_input(value: Tensor, hook: Any) -> Tensor:
            if mid is None:  # clones: a copy of its own, as TransformerLens 3's hook_mlp_in
                return mlp_in(value.clone())
            stream = mid(value)
            self._mid_moved[layer] = stream - value
            return mlp_in(stream.clone())

        return mlp_input

    def _reroute(self, layer: int) -> HookFn:
        def reroute(value: Tensor, hook: Any) -> Tensor:
            return value + self._mid_moved.pop(layer).to(value.dtype)

        return reroute

    def _keep(self, layer: int) -> HookFn:
        def keep(value: Tensor, hook: Any) -> None:
            self._resid[layer] = value

        return keep

    def _project(self, layer: int, side: str) -> HookFn:
        W, b = self.projections[layer][side]
        point = self.points[input_hook_name(layer, side)]

        def project(
            value: Float[Tensor, "batch pos head d_head"], hook: Any
        ) -> Float[Tensor, "batch pos head d_head"]:
            if value.shape[2] != W.shape[0]:
                raise UnsupportedModelError(
                    f"blocks.{layer}.attn.hook_{side} has {value.shape[2]} heads where its "
                    f"weights have {W.shape[0]}; per-head inputs cannot be rebuilt here"
                )
            shared = einops.repeat(self._resid[layer], "b p d -> b p h d", h=W.shape[0])
            copies = point(shared)
            normed = self._normalise(layer, copies)
            y = einops.einsum(normed, W.to(normed.dtype), "b p h d, h d e -> b p h e") + b
            y = y.to(value.dtype)
            kept = value.detach() + (y - y.detach())
            if copies is shared:
                return kept
            changed = (copies != shared).flatten(3).any(-1).any(1).any(0)  # [head]
            return torch.where(changed.view(1, 1, -1, 1), y, kept)

        return project

    def _normalise(
        self, layer: int, x: Float[Tensor, "batch pos head d_model"]
    ) -> Float[Tensor, "batch pos head d_model"]:
        """``ln1`` on each head's copy, its scale and normalised value fired through the bridge's
        own ``ln1.hook_scale`` and ``ln1.hook_normalized`` (``[batch, pos, head, ...]``)."""
        norm = self.norms[layer]
        if norm is None or norm.kind == "none":
            return x
        if norm.centres:
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        scale_point, normalized_point = self._norm_points[layer]
        if scale_point is not None:
            scale = scale_point(scale)
        x = x / scale
        if normalized_point is not None:
            x = normalized_point(x)
        if norm.w is not None:
            x = x * norm.w
        return x + norm.b if norm.b is not None else x
