"""The pattern side's gradient without any ``query x key`` tensor in the autograd graph.

On the pattern side a head's output gains ``w M(s) v`` (:mod:`depass_lens.qk`), where ``s`` is
bilinear in the live queries and keys, ``s = ratio (a q . k_fixed + b q_fixed . k) / scale``, and
``M`` is an integrated softmax Jacobian (symmetric). Adjoint mode only needs the gradient of that
term: with ``g`` the gradient at ``hook_z``, the gradient at the shares is ``M(w g v^T)``, and at
the queries and keys it is that times the fixed keys and queries (and the soft cap's ratio).
:meth:`~depass_lens.integrated_softmax.IntegratedSoftmax.contract` computes exactly those two
products chunk by chunk, so :class:`PatternTerm` is a zero-valued tensor whose backward pass is
two such products, O(query x key) in time and O(query) in memory.

The same backward pass also gives the term's constants per head (the quadrature remainder and
the constant part of the shares), which the caller receives through ``on_constants``: with
``G = ratio * M(w g v^T)``, ``<R, w g v^T> = <w g, moved_v> - <s_real - s_0, M(w g v^T)>`` and the
second product is ``(a <q_offset, G k_fixed> + b <k_offset, G^T q_fixed>) / scale`` for the
offsets ``q_0 - q_real`` and ``k_0 - k_real`` (ALiBi and other additive terms cancel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.integrated_softmax import IntegratedSoftmax


@dataclass
class PatternTerm:
    """What the pattern side of one head layer needs besides the live queries and keys.

    Attributes:
        integrated: ``M`` (from uniform, or on a path between two runs).
        values: ``v`` the moved pattern multiplies, ``[batch, key, head, d_head]`` (fixed).
        queries / keys: the fixed queries and keys of the bilinear form (rotated, per head).
        weight_q / weight_k: ``a`` and ``b``; ``scale``: the attention scale.
        weight: ``w``, how much of ``M(s) v`` the output receives.
        ratio: the soft cap's ratio per score (``None`` without a cap).
        moved_values: ``(A - base) v``, what ``M(s_real)`` would give without quadrature error
            (``base`` the path's start pattern), for the remainder.
        query_offset / key_offset: ``q_0 - q_real`` and ``k_0 - k_real`` (``None``: no
            constants to record).
        on_constants: receives ``[batch, head]`` constants during the backward pass.
    """

    integrated: IntegratedSoftmax
    values: Float[Tensor, "batch key head d_head"]
    queries: Float[Tensor, "batch query head d"]
    keys: Float[Tensor, "batch key head d"]
    weight_q: float
    weight_k: float
    scale: float
    weight: float
    ratio: Float[Tensor, "batch head query key"] | None
    moved_values: Float[Tensor, "batch query head d_head"]
    query_offset: Tensor | None
    key_offset: Tensor | None
    on_constants: Callable[[Tensor], None] | None = None

    def apply(
        self,
        live_queries: Float[Tensor, "batch query head d"],
        live_keys: Float[Tensor, "batch key head d"],
    ) -> Float[Tensor, "batch query head d_head"]:
        """Zeros whose gradient reaches ``live_queries`` and ``live_keys`` as ``w M(s) v`` would."""
        return _PatternTermFn.apply(live_queries, live_keys, self)  # type: ignore[no-any-return]


class _PatternTermFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, queries: Tensor, keys: Tensor, term: PatternTerm) -> Tensor:
        ctx.term = term
        batch, n_query, n_head, _ = queries.shape
        return queries.new_zeros(batch, n_query, n_head, term.values.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        term: PatternTerm = ctx.term
        left = term.weight * grad
        out_q, out_k = term.integrated.contract(
            left, term.values.to(left.dtype), term.queries, term.keys, term.ratio
        )
        if term.on_constants is not None:
            # products broadcast: the fixed tensors may hold one prompt for many copies of it
            moved = (left * term.moved_values.to(left.dtype)).sum((1, 3))
            shares = torch.zeros_like(moved)
            if term.query_offset is not None:
                offset = term.query_offset.to(out_q.dtype)
                shares = shares + term.weight_q * (offset * out_q).sum((1, 3))
            if term.key_offset is not None:
                offset = term.key_offset.to(out_k.dtype)
                shares = shares + term.weight_k * (offset * out_k).sum((1, 3))
            term.on_constants((moved + shares / term.scale).detach())
        grad_q = (term.weight_q / term.scale) * out_q
        grad_k = (term.weight_k / term.scale) * out_k
        return grad_q, grad_k, None
