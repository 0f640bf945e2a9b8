"""The integrated softmax Jacobian: how a change of attention scores moves the pattern.

``M(v) = int_0^1 J(alpha s) v d alpha`` maps score shares to pattern shares: along the path
``alpha s`` from the uniform pattern to the real one, ``M(s) = A - U`` exactly, and ``M`` is linear,
so it splits the pattern's move away from uniform among the components that share the scores
(the pattern side of :class:`~depass_lens.qk.AttentionSplit`). It is also symmetric, so its
backward pass is ``M`` itself.

The integral is a quadrature per query row, chosen from that row's score spread ``S`` (max - min
over its unmasked keys) and its number of keys ``K``:

- narrow rows (``S`` up to about 20): plain Gauss-Legendre on ``[0, 1]``, as many nodes as
  :data:`PLAIN_NODES` gives for ``S``;
- wide rows: composite Gauss-Legendre on geometrically graded panels ``[0, c/S]``,
  ``[c/S, c r/S]``, ..., ``[., 1]`` (:data:`PANEL_NODES` nodes each). Along ``alpha`` the pattern
  moves on the scale ``1/S`` near ``alpha = 0`` and ever more slowly further out (the softmax
  saturates), so the number of panels grows with ``log S`` instead of the node count growing with
  ``S``; the panel ratio ``r`` shrinks with ``log K`` (the logistic flank of a key that must
  outweigh ``K`` others sits at ``alpha ~ log(K) / S``).

Whichever of the two needs fewer nodes is used. On adversarial rows (one or a few keys apart,
two clusters, ladders, exponential and Gaussian scores; spreads up to 16384, up to 8192 keys) the
quadrature error is below 3e-7 of the row's own ``|A - U|`` (so also of the layer's). Rows are
processed in chunks of rows with the same node count, restricted to the span of keys they may see
(the masked half of causal rows is never touched), with all nodes of a chunk in one softmax and
two batched matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor


def gauss_legendre(n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``n`` Gauss-Legendre nodes and weights on ``[0, 1]``."""
    nodes, weights = _gauss_legendre01(n)
    to = dict(dtype=like.dtype, device=like.device)
    return torch.tensor(nodes, **to), torch.tensor(weights, **to)  # type: ignore[arg-type]


@lru_cache(maxsize=64)
def _gauss_legendre01(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (nodes + 1) / 2, weights / 2


#: Node patterns are kept (not recomputed per call) while their stack stays below this size per
#: layer (forward mode keeps one integrator per layer for the whole run).
KEEP_PATTERNS_BYTES = 128 * 2**20
#: Plain Gauss-Legendre nodes for rows whose score spread is at most the key: the fewest that keep
#: the quadrature error below 3e-7 of the row's ``|A - U|`` on adversarial rows (2 to 8192 keys).
PLAIN_NODES = (
    (0.0, 1),
    (0.1, 2),
    (0.5, 3),
    (1.0, 4),
    (2.0, 5),
    (3.0, 6),
    (4.0, 8),
    (5.0, 9),
    (6.0, 10),
    (8.0, 13),
    (10.0, 16),
    (12.0, 20),
    (16.0, 28),
    (20.0, 32),
)
#: Graded composite rule for wider rows: Gauss-Legendre nodes per panel, the first panel
#: ``[0, FIRST_PANEL / S]``, then panels growing geometrically to 1 by at most
#: ``min(MAX_RATIO, 1 + RATIO_LOG_KEYS / log K)`` each.
PANEL_NODES = 8
FIRST_PANEL = 4.0
MAX_RATIO = 3.0
RATIO_LOG_KEYS = 6.0
#: A row whose remainder stays above the tolerance (``exact=True``) has its nodes per panel doubled
#: while its total stays at most this.
MAX_NODES = 512
#: Rows stop doubling once their remainder is within this many roundings (``eps`` of the pattern's
#: dtype) of the pattern: below that, more nodes only move rounding about.
ROUNDING_FLOOR = 4
#: Elements of the node-pattern stack ``[rows, nodes, keys]`` per chunk (cache-sized on the CPU).
CHUNK_ELEMENTS = {"cpu": 2**19, "other": 2**25}


@dataclass
class _Chunk:
    """Rows (flat indices into ``batch head query``) with the same node count, their key span
    ``[lo, hi)``, and each row's own nodes and weights on ``[0, 1]``."""

    b: Tensor
    h: Tensor
    q: Tensor
    lo: int
    hi: int
    alphas: Tensor  # [rows, nodes]
    weights: Tensor  # [rows, nodes]
    segments: list[tuple[int, int, int, int]]  # (start, stop, batch, head): runs of one head
    patterns: Tensor | None = None  # [rows, nodes, hi - lo] when kept

    def select(self, keep: Tensor) -> _Chunk:
        patterns = self.patterns[keep] if self.patterns is not None else None
        b, h = self.b[keep], self.h[keep]
        return _Chunk(
            b,
            h,
            self.q[keep],
            self.lo,
            self.hi,
            self.alphas[keep],
            self.weights[keep],
            _segments(b.cpu().numpy(), h.cpu().numpy()),
            patterns,
        )


class IntegratedSoftmax:
    """``M(v) = int_0^1 J(alpha s) v d alpha``: how a change of scores moves the pattern.

    ``J(x) = diag(softmax x) - softmax x softmax x^T`` is the softmax Jacobian (per query row,
    over the unmasked keys); along the path ``alpha s`` from the uniform pattern ``U``
    (``alpha = 0``) to the real pattern ``A``, ``M(s) = A - U`` exactly (the quadrature's small
    remainder is kept so callers can give it to ``bias``). ``M`` is linear, so ``M(s_c)`` splits
    ``A - U`` among the components that share the scores, and symmetric, so its backward pass is
    ``M`` itself (no per-node tensors are stored for autograd).

    Each query row gets its own quadrature from its score spread and key count (see the module
    docstring); with ``exact=True`` a row whose remainder is still above ``tolerance`` of
    ``|A - U|`` (the largest over the layer) has its nodes doubled, up to :data:`MAX_NODES`.
    ``nodes`` forces plain ``nodes``-point Gauss-Legendre on every row (no doubling).
    :attr:`n_nodes` is the largest node count of any row.

    ``start`` (gradient-only, ``exact=False``) integrates on the straight path from ``start`` to
    ``scores`` instead: ``M(s - start) = softmax(s) - softmax(start)``, the softmax's exact secant
    between two runs (:mod:`depass_lens.difference`), with the plain rule on each row's spread of
    ``s - start``.
    """

    def __init__(
        self,
        scores: Float[Tensor, "batch head query key"],
        allowed: Bool[Tensor, "batch head query key"],
        pattern: Float[Tensor, "batch head query key"],
        nodes: int | None = None,
        tolerance: float = 1e-6,
        exact: bool = True,
        start: Float[Tensor, "batch head query key"] | None = None,
        keep_patterns: bool | None = None,
    ):
        if start is not None and exact:
            raise ValueError("a path from start scores is gradient-only: pass exact=False")
        self.allowed = allowed
        # The straight path start -> scores reads both where it is used, chunk by chunk: no
        # ``query x key`` copy of either, or of their difference, is made.
        self._start = start
        self._raw = scores
        self._shape = torch.broadcast_shapes(scores.shape, allowed.shape)
        self._budget = CHUNK_ELEMENTS["cpu" if scores.device.type == "cpu" else "other"]
        self._scores: Tensor | None = None
        self._uniform: Tensor | None = None
        self._remainder: Tensor | None = None
        # adjoint mode applies M once, unless told it will contract many times (feature graphs)
        retain = exact if keep_patterns is None else keep_patterns
        self._keep_bytes = KEEP_PATTERNS_BYTES if retain else 0
        self._stats = _row_stats(scores, allowed, self._budget, start)
        # computed in float32 at least (half-precision inputs get their own dtype back)
        self._work = torch.promote_types(scores.dtype, torch.float32)
        spread, keys = self._stats.spread, self._stats.keys
        rows = np.flatnonzero(keys > 0)  # rows without keys (padding) have M = 0
        if nodes is not None:
            per_panel = np.full(rows.shape, nodes, dtype=np.int64)
            panels = np.ones(rows.shape, dtype=np.int64)
        elif start is not None:  # the pattern may turn anywhere on the path: plain rule only
            per_panel, panels = _plain_rule(spread[rows]), np.ones(rows.shape, dtype=np.int64)
        else:
            per_panel, panels = _rules(spread[rows], keys[rows])
        self._per_panel = np.zeros(keys.shape, dtype=np.int64)
        self._panels = np.ones(keys.shape, dtype=np.int64)
        self._per_panel[rows], self._panels[rows] = per_panel, panels
        self._chunks = self._plan(rows)
        if not exact:  # gradients only (adjoint mode): no remainder
            self.error = float("nan")
            return
        uniform = self._uniform_in(self._work)
        if scores.dtype == self._work:
            self._uniform = uniform
        target = pattern.to(self._work) - uniform
        scale = target.abs().max().clamp_min(torch.finfo(self._work).tiny)
        remainder = target - self._moved(self._chunks)
        self.error = float(remainder.abs().max() / scale)
        # More nodes cannot take a row's remainder below the rounding of the pattern it is given
        # (a float32 softmax over many keys can be off by tens of eps): rows stop at a floor, and
        # once doubling their nodes failed to halve their remainder (Gauss-Legendre converges
        # much faster than that, so what is left is rounding).
        floor = max(tolerance * float(scale), ROUNDING_FLOOR * torch.finfo(pattern.dtype).eps)
        stalled = np.zeros(keys.shape, dtype=bool)
        failing = np.zeros(0, dtype=np.int64)
        before = np.zeros(keys.shape)
        while nodes is None and self.error > tolerance:
            row_error = remainder.abs().amax(-1).reshape(-1).cpu().numpy()
            stalled[failing] = row_error[failing] > before[failing] / 2
            before = row_error
            total = self._per_panel * self._panels
            failing = np.flatnonzero((row_error > floor) & ~stalled & (2 * total <= MAX_NODES))
            if not failing.size:
                break
            self._per_panel[failing] *= 2
            marked = torch.zeros(keys.shape, dtype=torch.bool)
            marked[torch.from_numpy(failing)] = True
            marked = marked.to(scores.device)
            kept = []
            for chunk in self._chunks:
                keep = ~marked[self._flat(chunk)]
                if bool(keep.all()):
                    kept.append(chunk)
                elif bool(keep.any()):
                    kept.append(chunk.select(keep))
            redone = self._plan(failing)
            self._chunks = kept + redone
            b, h, q = _unflatten(torch.from_numpy(failing).to(scores.device), self._shape)
            remainder[b, h, q] = target[b, h, q] - self._moved(redone)[b, h, q]
            self.error = float(remainder.abs().max() / scale)
        if scores.dtype != self._work:  # back to the scores' dtype, with its rounding of U
            remainder = (remainder + (uniform - self.uniform.to(self._work))).to(scores.dtype)
        self._remainder = remainder

    # ------------------------------------------------------------------ public attributes
    @property
    def n_nodes(self) -> int:
        """The largest number of quadrature nodes (softmax evaluations) of any row."""
        return int((self._per_panel * self._panels).max(initial=0))

    @property
    def scores(self) -> Float[Tensor, "batch head query key"]:
        """The scores with zeros where masked."""
        if self._scores is None:
            raw = self._raw if self._start is None else self._raw - self._start
            self._scores = torch.where(self.allowed, raw, 0.0).expand(self._shape)
        return self._scores

    @property
    def uniform(self) -> Float[Tensor, "batch head query key"]:
        """``U``: the pattern of equal scores (zero on rows without keys)."""
        if self._uniform is None:
            self._uniform = self._uniform_in(self._raw.dtype)
        return self._uniform

    def _uniform_in(self, dtype: torch.dtype) -> Tensor:
        count = self._stats.counts.clamp_min(1).to(dtype).unsqueeze(-1)
        return torch.where(self.allowed, 1 / count, 0.0).expand(self._shape)

    @property
    def remainder(self) -> Float[Tensor, "batch head query key"]:
        """``A - U - M(s)`` (zeros with ``exact=False``)."""
        if self._remainder is None:
            self._remainder = torch.zeros_like(self.uniform)
        return self._remainder

    # ------------------------------------------------------------------ M
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

    def contract(
        self,
        left: Float[Tensor, "batch query head r"],
        right: Float[Tensor, "batch key head r"],
        queries: Float[Tensor, "batch query head e"],
        keys: Float[Tensor, "batch key head e"],
        ratio: Float[Tensor, "batch head query key"] | None = None,
    ) -> tuple[Float[Tensor, "batch query head e"], Float[Tensor, "batch key head e"]]:
        """``(G keys, G^T queries)`` per head, with ``G = ratio * M(left right^T)``, without any
        ``query x key`` tensor (each chunk of rows builds its own tile of ``left right^T``).

        Adjoint mode's pattern side needs exactly this: with ``g`` the gradient at ``hook_z`` and
        ``v`` the real values, the gradient at the score shares is ``M(g v^T)`` (``M`` is
        symmetric), and at the queries and keys that build the shares it is that times the real
        keys and queries (and the soft cap's frozen ratio). ``ratio`` defaults to 1.

        ``left`` may also hold many copies of this one prompt (a feature graph's batched
        receivers: ``queries``, ``keys`` and the integrator on one prompt): ``M`` is the same for
        every copy, so the copies ride along as components of each row and every node pattern is
        formed once for all of them.
        """
        shared = left.shape[0] != queries.shape[0]
        if shared and (queries.shape[0] != 1 or self._shape[0] != 1):
            raise ValueError("shared contraction needs the integrator and its queries on 1 prompt")
        out_q = queries.new_zeros((left.shape[0], *queries.shape[1:]))
        out_k = keys.new_zeros((left.shape[0], *keys.shape[1:]))
        dtype = torch.promote_types(left.dtype, self._work)
        for chunk in self._chunks:
            patterns = self._node_patterns(chunk)
            keys_span = slice(chunk.lo, chunk.hi)
            # one run of a head per segment; ``c`` are the copies of the prompt that ride along
            # as components of each row (a feature graph's batched receivers), else 1
            tiles = [  # [rows, copies, keys]
                (
                    left[slice(None) if shared else slice(b, b + 1), chunk.q[start:stop], h].to(
                        dtype
                    )
                    @ right[b, keys_span, h].transpose(0, 1).to(dtype)
                ).transpose(0, 1)
                for start, stop, b, h in chunk.segments
            ]
            tile = torch.cat(tiles) if len(tiles) > 1 else tiles[0]
            tile = self._centred(chunk, slice(None), tile)
            moved = _combine(patterns.to(dtype), chunk.weights.to(dtype), tile)
            if ratio is not None:
                scale = ratio[chunk.b, chunk.h, chunk.q, keys_span].to(moved.dtype)
                moved = moved * scale.unsqueeze(1)
            for start, stop, b, h in chunk.segments:
                rows, part = chunk.q[start:stop], moved[start:stop]
                into = slice(None) if shared else slice(b, b + 1)
                k_part = keys[b, keys_span, h].to(part.dtype)
                q_part = queries[b, rows, h].to(part.dtype)
                out_q[into, rows, h] = (part.transpose(0, 1) @ k_part).to(out_q.dtype)
                pulled = part.permute(1, 2, 0) @ q_part  # [copies, keys, e]
                out_k[into, keys_span, h] += pulled.to(out_k.dtype)
        return out_q, out_k

    def _apply(self, shares: Tensor) -> Tensor:
        out = torch.zeros_like(shares)
        n_comp = shares.shape[1]
        dtype = torch.promote_types(shares.dtype, self._work)
        for chunk in self._chunks:
            patterns = self._node_patterns(chunk)
            step = max(1, self._budget // max(1, n_comp * (chunk.hi - chunk.lo)))
            for start in range(0, len(chunk.b), step):
                part = slice(start, start + step)
                b, h, q = chunk.b[part], chunk.h[part], chunk.q[part]
                v = shares[b, :, h, q, chunk.lo : chunk.hi].to(dtype)  # [rows, comp, keys]
                moved = _combine(
                    patterns[part].to(dtype),
                    chunk.weights[part].to(dtype),
                    self._centred(chunk, part, v),
                )
                out[b, :, h, q, chunk.lo : chunk.hi] = moved.to(out.dtype)
        return out

    # ------------------------------------------------------------------ internals
    def _flat(self, chunk: _Chunk) -> Tensor:
        _, n_head, n_query, _ = self._shape
        return (chunk.b * n_head + chunk.h) * n_query + chunk.q

    def _centred(self, chunk: _Chunk, part: slice, v: Tensor) -> Tensor:
        """``v`` (``[rows, comp, keys]``, the rows ``part`` of ``chunk``) less its value at each
        row's top-scoring key: the same ``M(v)``, since ``M`` ignores a constant per row.

        Near the real pattern (where the quadrature puts most of its weight) ``p_n`` sits on the
        top keys, so ``p_n * v`` and ``p_n (p_n . v)`` are both about ``v_top`` and cancel to
        ``M(v)``'s own size: float32 would lose ``|v_top| eps`` per node (``5e-4`` of the
        pattern for ``v = s`` at a score spread of 500); centred, the cancelling terms are only
        ``v``'s variation across the keys the pattern holds.
        """
        top = self._stats.top[chunk.b[part], chunk.h[part], chunk.q[part]] - chunk.lo
        return v - v.gather(-1, top.view(-1, 1, 1).expand(-1, v.shape[1], 1))

    def _tile(self, chunk: _Chunk) -> tuple[Tensor, Tensor]:
        """The chunk's scores (their change from ``start``, if given) less each row's largest, in
        the working dtype, and its mask.

        ``M`` and ``softmax(alpha s)`` ignore a constant per row, and without it the terms the
        quadrature sums are ``O(|s|)`` where they cancel to ``O(1)`` (see :meth:`_centred`); the
        logits ``alpha s`` themselves would also carry ``alpha |s| eps`` of rounding.
        """
        keys = slice(chunk.lo, chunk.hi)
        allowed = self.allowed.expand(self._shape)[chunk.b, chunk.h, chunk.q, keys]
        x = self._raw.expand(self._shape)[chunk.b, chunk.h, chunk.q, keys].to(self._work)
        if self._start is not None:  # undefined where masked (-inf - -inf): callers mask it
            x = x - self._start.expand(self._shape)[chunk.b, chunk.h, chunk.q, keys].to(x.dtype)
        high = self._stats.high[chunk.b, chunk.h, chunk.q].to(self._work)
        return x - high.unsqueeze(-1), allowed

    def _node_patterns(self, chunk: _Chunk) -> Tensor:
        """``softmax(start + alpha_n s)`` of each row at each of its nodes (``start`` 0 unless
        given): ``[rows, nodes, keys]``."""
        if chunk.patterns is not None:
            return chunk.patterns
        x, allowed = self._tile(chunk)
        x = torch.where(allowed, x, -torch.inf)
        logits = x.unsqueeze(1) * chunk.alphas.unsqueeze(-1)
        if self._start is not None:
            begin = self._start.expand(self._shape)[chunk.b, chunk.h, chunk.q, chunk.lo : chunk.hi]
            logits = torch.where(allowed.unsqueeze(1), logits + begin.unsqueeze(1), -torch.inf)
        patterns = torch.softmax(logits, dim=-1)
        size = patterns.numel() * patterns.element_size()
        if size <= self._keep_bytes:
            self._keep_bytes -= size
            chunk.patterns = patterns
        return patterns

    def _moved(self, chunks: list[_Chunk]) -> Tensor:
        """``M(s)`` on the rows of ``chunks`` (zeros elsewhere)."""
        moved = torch.zeros(self._shape, dtype=self._work, device=self._raw.device)
        for chunk in chunks:
            x, allowed = self._tile(chunk)
            s = torch.where(allowed, x, 0.0).unsqueeze(1)  # already centred: zero at the top key
            m = _combine(self._node_patterns(chunk), chunk.weights, s)
            moved[chunk.b, chunk.h, chunk.q, chunk.lo : chunk.hi] = m[:, 0]
        return moved

    def _plan(self, rows: np.ndarray) -> list[_Chunk]:
        """Chunks of ``rows`` (flat indices): same node count, similar key spans."""
        stats = self._stats
        _, n_head, n_query, _ = self._shape
        total = self._per_panel[rows] * self._panels[rows]
        query = rows % n_query
        lo, hi = stats.lo[query], stats.hi[query]
        total = _slots(total, hi - lo, self._budget)
        order = np.lexsort((query, rows // n_query, total))  # by slots, then batch and head
        rows, total, lo, hi = rows[order], total[order], lo[order], hi[order]
        device, dtype = self._raw.device, self._work
        index_np = np.stack([rows // (n_head * n_query), rows // n_query % n_head, rows % n_query])
        index = torch.from_numpy(index_np).to(device)
        chunks = []
        starts = np.flatnonzero(np.diff(total, prepend=-1))
        for group, end in zip(starts, [*starts[1:], len(rows)]):
            n = int(total[group])
            alphas, weights = (
                torch.from_numpy(a).to(device=device, dtype=dtype)
                for a in _nodes(
                    stats.spread[rows[group:end]],
                    self._per_panel[rows[group:end]],
                    self._panels[rows[group:end]],
                    n,
                )
            )
            cost = n * (hi[group:end] - lo[group:end])
            cut = (np.cumsum(cost) - cost) // self._budget
            edges = np.flatnonzero(np.diff(cut, prepend=-1))
            for start, stop in zip(edges, [*edges[1:], end - group]):
                part = slice(group + start, group + stop)
                b, h, q = index[:, part]
                chunks.append(
                    _Chunk(
                        b,
                        h,
                        q,
                        int(lo[part].min()),
                        int(hi[part].max()),
                        alphas[start:stop],
                        weights[start:stop],
                        _segments(index_np[0, part], index_np[1, part]),
                    )
                )
        return chunks


def _combine(patterns: Tensor, weights: Tensor, v: Tensor) -> Tensor:
    """``sum_n w_n (p_n * v - p_n (p_n . v))`` per row: patterns ``[rows, nodes, keys]``, weights
    ``[rows, nodes]``, ``v`` ``[rows, comp, keys]``."""
    dots = torch.bmm(v, patterns.transpose(1, 2))  # [rows, comp, nodes]
    mean = torch.bmm(weights.unsqueeze(1), patterns)  # [rows, 1, keys]: sum_n w_n p_n
    return torch.baddbmm(mean * v, dots * weights.unsqueeze(1), patterns, alpha=-1)


@dataclass
class _RowStats:
    spread: np.ndarray  # [batch * head * query] float64: max - min over the unmasked keys
    keys: np.ndarray  # [batch * head * query] int64: unmasked keys
    counts: Tensor  # the same, [batch, head, query] on the scores' device
    lo: np.ndarray  # [query]: first key any row of that query position may see
    hi: np.ndarray  # [query]: one past the last
    high: Tensor  # [batch, head, query] on the scores' device: the largest unmasked score (or 0)
    top: Tensor  # [batch, head, query] int64: its key (0 on rows without keys)


def _row_stats(
    scores: Tensor, allowed: Tensor, budget: int, origin: Tensor | None = None
) -> _RowStats:
    """Per-row statistics of ``scores`` (less ``origin`` if given) over the unmasked keys,
    formed ``budget`` elements at a time."""
    shape = torch.broadcast_shapes(scores.shape, allowed.shape)
    n_batch, n_head, n_query, n_key = shape
    seen = allowed.expand(shape).flatten(0, 1).any(0)  # [query, key]
    lo = seen.to(torch.uint8).argmax(-1)
    hi = n_key - seen.flip(-1).to(torch.uint8).argmax(-1)
    lo_np, hi_np = lo.cpu().numpy().astype(np.int64), hi.cpu().numpy().astype(np.int64)
    hi_np = np.where(seen.gather(-1, lo.unsqueeze(-1))[:, 0].cpu().numpy(), hi_np, lo_np)
    spread = torch.zeros(n_batch, n_head, n_query, dtype=scores.dtype, device=scores.device)
    highest = torch.zeros_like(spread)
    keys = torch.zeros(n_batch, n_head, n_query, dtype=torch.int64, device=scores.device)
    top = torch.zeros_like(keys)
    s, a = scores.expand(shape), allowed.expand(shape)
    begin = None if origin is None else origin.expand(shape)
    step = max(1, budget // max(1, n_batch * n_head * n_key))
    for start in range(0, n_query, step):
        stop = min(n_query, start + step)
        k0, k1 = int(lo_np[start:stop].min()), int(hi_np[start:stop].max())
        if k1 <= k0:
            continue
        x, m = s[:, :, start:stop, k0:k1], a[:, :, start:stop, k0:k1]
        if begin is not None:
            x = x - begin[:, :, start:stop, k0:k1]
        high, arg = torch.where(m, x, -torch.inf).max(-1)
        low = torch.where(m, x, torch.inf).amin(-1)
        count = m.sum(-1)
        keys[:, :, start:stop] = count
        spread[:, :, start:stop] = torch.where(count > 0, high - low, 0.0)
        highest[:, :, start:stop] = torch.where(count > 0, high, 0.0)
        top[:, :, start:stop] = arg + k0
    return _RowStats(
        spread.reshape(-1).double().cpu().numpy(),
        keys.reshape(-1).cpu().numpy(),
        keys,
        lo_np,
        hi_np,
        highest,
        top,
    )


def _plain_rule(spread: np.ndarray) -> np.ndarray:
    """Plain Gauss-Legendre node counts by spread, continued linearly past the table (for paths
    that do not start at the uniform pattern, where graded panels do not apply)."""
    limits = np.array([limit for limit, _ in PLAIN_NODES])
    counts = np.array([n for _, n in PLAIN_NODES] + [0])
    plain = counts[np.searchsorted(limits, spread, side="left")]
    wide = np.minimum(MAX_NODES, np.ceil(2 * spread)).astype(np.int64)
    return np.where(spread > limits[-1], wide, plain).astype(np.int64)


def _rules(spread: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: nodes per panel and panel count (one panel: plain Gauss-Legendre on [0, 1])."""
    limits = np.array([limit for limit, _ in PLAIN_NODES])
    counts = np.array([n for _, n in PLAIN_NODES] + [np.iinfo(np.int64).max // 4])
    plain = counts[np.searchsorted(limits, spread, side="left")]
    ratio = np.minimum(MAX_RATIO, 1 + RATIO_LOG_KEYS / np.log(np.maximum(keys, math.e)))
    wide = spread > FIRST_PANEL
    growth = np.log(np.where(wide, spread, FIRST_PANEL) / FIRST_PANEL) / np.log(ratio)
    panels = 1 + np.ceil(growth - 1e-9).clip(min=0).astype(np.int64)
    graded = wide & (PANEL_NODES * panels < plain)
    per_panel = np.where(graded, PANEL_NODES, plain)
    return per_panel.astype(np.int64), np.where(graded, panels, 1)


def _nodes(
    spread: np.ndarray, per_panel: np.ndarray, panels: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nodes and weights on ``[0, 1]`` (``[rows, total]``, float64; a row with fewer
    nodes is padded with zero-weight nodes)."""
    alphas = np.full((len(spread), total), 0.5)
    weights = np.zeros((len(spread), total))
    for key in np.unique(per_panel * (MAX_NODES + 1) + panels).tolist():
        n, m = divmod(key, MAX_NODES + 1)
        which = (per_panel == n) & (panels == m)
        x, w = _gauss_legendre01(n)
        if m == 1:
            edges = np.broadcast_to(np.array([0.0, 1.0]), (int(which.sum()), 2))
        else:  # [0, a0], then geometric from a0 to 1
            first = FIRST_PANEL / spread[which]
            steps = 1 - np.arange(m) / (m - 1)
            edges = np.concatenate(
                [np.zeros((len(first), 1)), first[:, None] ** steps[None, :]], axis=1
            )
        start, width = edges[:, :-1], np.diff(edges, axis=1)
        alphas[which, : n * m] = (start[:, :, None] + width[:, :, None] * x).reshape(-1, n * m)
        weights[which, : n * m] = (width[:, :, None] * w).reshape(-1, n * m)
    return alphas, weights


def _slots(total: np.ndarray, width: np.ndarray, budget: int) -> np.ndarray:
    """Node slots per row: its node count, or that of the next larger count in the layer when
    padding the smaller group there (with zero-weight nodes) costs less than ``budget`` elements
    of softmax (a chunk's worth), which saves the chunk's fixed cost on small groups."""
    counts = np.unique(total)
    slots = total.copy()
    for small, large in zip(counts[:-1], counts[1:]):
        which = slots == small
        if int(width[which].sum()) * int(large - small) <= budget:
            slots[which] = large
    return slots


def _segments(batch: np.ndarray, head: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Runs of rows of one ``(batch, head)``: ``(start, stop, batch, head)``."""
    key = batch * (int(head.max(initial=0)) + 1) + head
    starts = np.flatnonzero(np.diff(key, prepend=-1))
    stops = [*starts[1:].tolist(), len(key)]
    return [(int(a), int(z), int(batch[a]), int(head[a])) for a, z in zip(starts.tolist(), stops)]


def _unflatten(index: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
    _, n_head, n_query, _ = shape
    return index // (n_head * n_query), (index // n_query) % n_head, index % n_query


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
