"""The integrated softmax Jacobian: how a change of attention scores moves the pattern.

``M(v) = int_0^1 J(alpha s) v d alpha`` maps score shares to pattern shares: along the path
``alpha s`` from the uniform pattern to the real one, ``M(s) = A - U`` exactly, and ``M`` is linear,
so it splits the pattern's move away from uniform among the components that share the scores
(the pattern side of :class:`~depass_lens.qk.AttentionSplit`). It is also symmetric, so its
backward pass is ``M`` itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor


def gauss_legendre(n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``n`` Gauss-Legendre nodes and weights on ``[0, 1]``."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    to = dict(dtype=like.dtype, device=like.device)
    return torch.tensor((nodes + 1) / 2, **to), torch.tensor(weights / 2, **to)  # type: ignore[arg-type]


#: Node patterns are kept (not recomputed per chunk) while their stack stays below this size per
#: layer (forward mode keeps one integrator per layer for the whole run).
KEEP_PATTERNS_BYTES = 128 * 2**20
#: Gauss-Legendre nodes that bring the quadrature remainder below 1e-6 of ``|A - U|`` for rows
#: whose score spread (max - min over the unmasked keys) is at most the key (measured on random
#: rows: 8 nodes reach 2e-7 at spread 10, 16 reach 7e-7 at 40, 32 reach 1e-6 at 160, 64 reach
#: 3e-9 at 320).
NODES_FOR_SPREAD = ((10.0, 8), (40.0, 16), (160.0, 32), (640.0, 64), (2560.0, 128))


class IntegratedSoftmax:
    """``M(v) = int_0^1 J(alpha s) v d alpha``: how a change of scores moves the pattern.

    ``J(x) = diag(softmax x) - softmax x softmax x^T`` is the softmax Jacobian (per query row,
    over the unmasked keys); along the path ``alpha s`` from the uniform pattern ``U``
    (``alpha = 0``) to the real pattern ``A``, ``M(s) = A - U`` exactly (the quadrature's small
    remainder is kept so callers can give it to ``bias``). ``M`` is linear, so ``M(s_c)`` splits
    ``A - U`` among the components that share the scores, and symmetric, so its backward pass is
    ``M`` itself (no per-node tensors are stored for autograd).

    Gauss-Legendre nodes: as many as the largest score spread of a row needs for a remainder below
    ``tolerance`` of ``|A - U|`` (see :data:`NODES_FOR_SPREAD`; one pass, doubled only if the
    measured remainder is still larger, up to 256), unless ``nodes`` is given.
    """

    def __init__(
        self,
        scores: Float[Tensor, "batch head query key"],
        allowed: Bool[Tensor, "batch head query key"],
        pattern: Float[Tensor, "batch head query key"],
        nodes: int | None = None,
        tolerance: float = 1e-6,
        exact: bool = True,
    ):
        self.scores = torch.where(allowed, scores, torch.zeros_like(scores))
        self.allowed = allowed
        self._mask = torch.where(allowed, 0.0, -torch.inf).to(scores.dtype)  # added to logits
        self._empty_rows = not bool(allowed.any(-1).all())  # padding: rows with no key at all
        self.uniform = self._pattern(torch.zeros((), dtype=scores.dtype, device=scores.device))
        self._patterns: Tensor | None = None
        if not exact:  # gradients only (adjoint mode): no remainder, nodes from the spread
            count = nodes if nodes is not None else _node_counts(scores, allowed)[0]
            self.alphas, self.weights = gauss_legendre(count, scores)
            self.remainder = torch.zeros_like(self.uniform)
            self.error = float("nan")
            return
        target = pattern.to(scores.dtype) - self.uniform
        scale = target.abs().max().clamp_min(torch.finfo(scores.dtype).tiny)
        counts = [nodes] if nodes is not None else _node_counts(scores, allowed)
        for count in counts:
            self.alphas, self.weights = gauss_legendre(count, scores)
            self._patterns = None
            remainder = target - self._apply(self.scores.unsqueeze(1))[:, 0]
            self.error = float(remainder.abs().max() / scale)
            if self.error <= tolerance:
                break
        self.remainder = remainder
        if self.alphas.numel() * scores.numel() * scores.element_size() <= KEEP_PATTERNS_BYTES:
            self._patterns = torch.stack([self._pattern(a) for a in self.alphas])

    @property
    def n_nodes(self) -> int:
        return int(self.alphas.numel())

    def _pattern(self, alpha: Tensor) -> Tensor:
        pattern = torch.softmax(alpha * self.scores + self._mask, dim=-1)
        return torch.nan_to_num(pattern, nan=0.0) if self._empty_rows else pattern

    def _apply(self, shares: Tensor) -> Tensor:
        out = torch.zeros_like(shares)
        for index, (alpha, weight) in enumerate(zip(self.alphas, self.weights)):
            pattern = self._patterns[index] if self._patterns is not None else self._pattern(alpha)
            p = pattern.unsqueeze(1).to(shares.dtype)
            out = out + weight * p * (shares - (p * shares).sum(-1, keepdim=True))
        return out

    def apply(
        self, shares: Float[Tensor, "batch comp head query key"]
    ) -> Float[Tensor, "batch comp head query key"]:
        """``M`` applied to each component's score shares (zero where masked)."""
        if shares.requires_grad:
            return _IntegratedSoftmaxFn.apply(shares, self, True)  # type: ignore[no-any-return]
        return self._apply(shares)

    def gradient_path(
        self, shares: Float[Tensor, "batch comp head query key"]
    ) -> Float[Tensor, "batch comp head query key"]:
        """Zeros whose gradient is that of ``M(shares)``: ``M(x) - M(x).detach()`` at a third of
        the cost (adjoint mode only needs the gradient of the pattern-side term)."""
        return _IntegratedSoftmaxFn.apply(shares, self, False)  # type: ignore[no-any-return]


def _node_counts(scores: Tensor, allowed: Tensor) -> list[int]:
    """The node count the widest row needs, then its doublings up to 256 (a fallback)."""
    high = torch.where(allowed, scores, torch.full_like(scores, -torch.inf)).amax(-1)
    low = torch.where(allowed, scores, torch.full_like(scores, torch.inf)).amin(-1)
    spreads = (high - low)[allowed.any(-1)]
    spread = float(spreads.max()) if spreads.numel() else 0.0
    first = next((n for limit, n in NODES_FOR_SPREAD if spread <= limit), 256)
    return [n for n in (8, 16, 32, 64, 128, 256) if n >= first]


class _IntegratedSoftmaxFn(torch.autograd.Function):
    """``M`` with the backward pass ``M^T = M``: autograd keeps no per-node tensors.

    With ``value=False`` the forward pass returns zeros (the gradient of ``M`` alone, when the
    caller subtracts the value anyway).
    """

    @staticmethod
    def forward(ctx: Any, shares: Tensor, integrated: IntegratedSoftmax, value: bool) -> Tensor:
        ctx.integrated = integrated
        return integrated._apply(shares) if value else torch.zeros_like(shares)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.integrated._apply(grad), None, None
