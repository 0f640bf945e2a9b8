"""The integrated softmax Jacobian ``M``: exactness, symmetry, linearity, and the per-row quadrature
against a brute-force reference (fine composite Gauss-Legendre, in float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import depass_lens.integrated_softmax as integrated_softmax
from depass_lens.integrated_softmax import IntegratedSoftmax

pytestmark = pytest.mark.numerics  # also run under test.sh's second math configuration

DOUBLE = torch.float64


def reference(
    scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, panels: int = 1000, nodes: int = 8
) -> torch.Tensor:
    """``M(v)`` by composite Gauss-Legendre on ``panels`` equal panels of ``[0, 1]`` (float64)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(0.0, 1.0, panels + 1)
    alphas = torch.tensor((edges[:-1, None] + np.diff(edges)[:, None] * (x + 1) / 2).ravel())
    weights = torch.tensor((np.diff(edges)[:, None] * w / 2).ravel())
    s = torch.where(allowed, scores, -torch.inf).to(DOUBLE).unsqueeze(1)  # b 1 h q k
    v = v.to(DOUBLE)
    out = torch.zeros_like(v)
    step = max(1, 2**22 // v.numel())
    for start in range(0, len(alphas), step):
        a = alphas[start : start + step].view(-1, 1, 1, 1, 1, 1)
        p = torch.nan_to_num(torch.softmax(a * s, -1))  # node b 1 h q k
        moved = p * (v - (p * v).sum(-1, keepdim=True))
        out += torch.einsum("n,n...->...", weights[start : start + step], moved)
    return out


def causal(batch: int, head: int, n: int, pad: int = 0) -> torch.Tensor:
    """A causal mask; the last prompt is left-padded by ``pad`` (its first rows see no key)."""
    allowed = torch.ones(n, n, dtype=torch.bool).tril().repeat(batch, head, 1, 1)
    if pad:
        allowed[-1, :, :, :pad] = False
        allowed[-1, :, :pad, :] = False
    return allowed


def softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(torch.softmax(torch.where(allowed, scores, -torch.inf), -1))


def random_scores(allowed: torch.Tensor, spread: float, seed: int, dtype=DOUBLE) -> torch.Tensor:
    """Scores with a mix of row shapes (Gaussian, one key far above, one far below, two clusters)
    scaled to row spreads up to ``spread``; ``-inf`` where masked."""
    gen = torch.Generator().manual_seed(seed)
    shape = allowed.shape
    kind = torch.randint(0, 4, shape[:-1] + (1,), generator=gen)
    noise = torch.randn(shape, generator=gen, dtype=DOUBLE)
    top = torch.zeros(shape, dtype=DOUBLE)
    top[..., 0] = 1.0
    clusters = (torch.rand(shape, generator=gen) < 0.5).to(DOUBLE)
    x = torch.where(kind == 0, noise, torch.where(kind == 1, top, -top))
    x = torch.where(kind == 3, clusters, x) + 1e-3 * noise
    masked = torch.where(allowed, x, torch.inf)
    x = x - masked.amin(-1, keepdim=True).clamp(-1e9, 1e9)
    high = torch.where(allowed, x, -torch.inf).amax(-1, keepdim=True).clamp_min(1e-12)
    row_spread = spread * torch.rand(shape[:-1] + (1,), generator=gen, dtype=DOUBLE) ** 2
    x = x / high * row_spread
    return torch.where(allowed, x, -torch.inf).to(dtype)


def shares_like(allowed: torch.Tensor, comps: int, seed: int, dtype=DOUBLE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b, h, q, k = allowed.shape
    v = torch.randn(b, comps, h, q, k, generator=gen, dtype=DOUBLE).to(dtype)
    return v * allowed.unsqueeze(1)


def gap(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.to(DOUBLE) - want.to(DOUBLE)).abs().max() / want.abs().max())


@pytest.mark.parametrize("spread", [0.3, 3.0, 12.0, 80.0, 2000.0])
def test_moves_the_pattern_exactly(spread):
    """``M(s) + remainder == A - U`` to rounding, and the remainder itself is below 1e-6."""
    allowed = causal(2, 3, 24, pad=5)
    scores = random_scores(allowed, spread, seed=1)
    pattern = softmax(scores, allowed)
    integrated = IntegratedSoftmax(scores, allowed, pattern)
    moved = integrated.apply(integrated.scores.unsqueeze(1))[:, 0]
    torch.testing.assert_close(moved + integrated.remainder + integrated.uniform, pattern)
    assert integrated.error <= 1e-6
    assert float(integrated.remainder.abs().max()) <= 1e-6 * float(
        (pattern - integrated.uniform).abs().max()
    )
    # the quadrature alone (no remainder) is within 1e-6 of each row's own |A - U|
    rows = (pattern - integrated.uniform).abs().amax(-1)
    assert bool(((moved - pattern + integrated.uniform).abs().amax(-1) <= 1e-6 * rows).all())
    # padding rows (no key at all): nothing moves, nothing is NaN
    assert not bool(integrated.uniform[-1, :, :5].any()) and not bool(moved[-1, :, :5].any())
    assert bool(torch.isfinite(moved).all())


@pytest.mark.parametrize("offset", [0.0, 300.0])
@pytest.mark.parametrize("spread", [1.0, 5.0, 20.0, 100.0, 500.0, 2000.0])
def test_float32_reconstructs_the_pattern(spread, offset):
    """float32 gives ``M(s) + remainder + U == A`` to float32 precision at any score spread and
    offset, and ``M(s)`` itself within the same bound of float64's (same rule).

    ``M`` ignores a constant per row, so the quadrature runs on scores less their row's largest
    and on shares less their value at the row's top key: every term it sums is then of the
    pattern's own size (at most 1) and each node's rounding is a few ``eps`` of the pattern,
    whatever the spread, so both gaps are within ``8 eps`` (about 1e-6; measured at most 0.5
    and 3 ``eps``). Uncentred, ``p_n * s`` and ``p_n (p_n . s)`` are ``O(|s|)`` and cancel to
    ``O(1)``: the error grew as ``|s| eps`` (1.9e-4 = 1600 ``eps`` at spread 500, 3e-6 at 20).
    """
    allowed = causal(2, 3, 40, pad=3)
    scores = random_scores(allowed, spread, seed=2, dtype=torch.float32) + offset
    pattern = softmax(scores, allowed)
    integrated = IntegratedSoftmax(scores, allowed, pattern)
    moved = integrated.apply(integrated.scores.unsqueeze(1))[:, 0]
    assert moved.dtype == integrated.remainder.dtype == torch.float32
    bound = 8 * torch.finfo(torch.float32).eps
    rebuilt = moved + integrated.remainder + integrated.uniform
    torch.testing.assert_close(rebuilt, pattern, rtol=0, atol=bound)
    double = IntegratedSoftmax(scores.double(), allowed, pattern.double(), exact=False)
    assert (double._per_panel * double._panels == integrated._per_panel * integrated._panels).all()
    want = double.apply(integrated.scores.double().unsqueeze(1))[:, 0]
    torch.testing.assert_close(moved.double(), want, rtol=0, atol=bound)


@pytest.mark.parametrize("spread", [5.0, 500.0])
def test_float32(spread):
    """``M(v)`` of unit shares in float32 against the brute-force reference: within 1e-5 of its
    largest entry (the quadrature's 3e-7 and float32's rounding of each node, a few ``eps``)."""
    allowed = causal(1, 4, 64)
    scores = random_scores(allowed, spread, seed=2, dtype=torch.float32)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed))
    v = shares_like(allowed, 3, seed=3)
    want = reference(scores, allowed, v, panels=250 if spread < 100 else 1000)
    assert gap(integrated.apply(v.float()), want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores(dtype):
    """Half-precision scores are integrated in float32 and given back in their own dtype: ``M(s)``
    is float32's rounded once (within ``eps`` of that dtype, values at most 1), the reconstruction
    holds to that dtype's three roundings (``2 eps``), and the rows keep float32's rule (the
    pattern's own rounding is no reason for more nodes)."""
    allowed = causal(1, 4, 48)
    scores = random_scores(allowed, 100.0, seed=30).to(dtype)
    pattern = softmax(scores.float(), allowed).to(dtype)
    integrated = IntegratedSoftmax(scores, allowed, pattern)
    moved = integrated.apply(integrated.scores.unsqueeze(1))[:, 0]
    assert moved.dtype == integrated.remainder.dtype == integrated.uniform.dtype == dtype
    eps = torch.finfo(dtype).eps
    rebuilt = moved.double() + integrated.remainder.double() + integrated.uniform.double()
    torch.testing.assert_close(rebuilt, pattern.double(), rtol=0, atol=2 * eps)
    single = IntegratedSoftmax(scores.float(), allowed, softmax(scores.float(), allowed))
    assert integrated.n_nodes <= single.n_nodes
    want = single.apply(single.scores.unsqueeze(1))[:, 0]
    torch.testing.assert_close(moved.double(), want.double(), rtol=0, atol=eps)


def test_the_pattern_rounding_buys_no_nodes():
    """A pattern is only as exact as its dtype, and the remainder keeps that rounding; more nodes
    cannot remove it, so float32 rows keep float64's rule (doubled once at most: a doubling that
    does not halve a row's remainder is its last).

    Two cases: one key 16.8 above 799 others, where float32's softmax drops most of the others'
    ``e^-16.8`` from its sum (its top entry is off by up to ``K e^-16.8``, about 350 ``eps``, on
    CPUs whose sum loses them), and a nearly uniform layer, whose ``|A - U|`` is so small that
    ``eps`` of ``A`` is above the relative tolerance. ``M(s)`` itself stays within 1e-6 (the
    tolerance, on the float64 pattern of the same scores).
    """
    n = 800
    gen = torch.Generator().manual_seed(31)
    gaps = torch.tensor([16.8, 17.5, 18.3, 19.9]).view(1, 1, 4, 1)
    wide = -gaps + 1e-3 * torch.randn(1, 1, 4, n, generator=gen)
    wide[..., 0] = 0.0
    narrow = random_scores(causal(1, 2, 64), 0.01, seed=32, dtype=torch.float32)
    for scores, allowed in (
        (wide, torch.ones(wide.shape, dtype=torch.bool)),
        (narrow, causal(1, 2, 64)),
    ):
        single = IntegratedSoftmax(scores, allowed, softmax(scores, allowed))
        double = IntegratedSoftmax(scores.double(), allowed, softmax(scores.double(), allowed))
        assert single.n_nodes <= 2 * double.n_nodes
        exact = softmax(scores.double(), allowed) - double.uniform
        moved = single.apply(single.scores.unsqueeze(1))[:, 0]
        assert float((moved.double() - exact).abs().max()) <= 1e-6 * float(exact.abs().max())


@pytest.mark.parametrize("spread", [0.05, 1.0, 7.0, 30.0, 300.0, 5000.0])
def test_agrees_with_brute_force(spread):
    """The per-row (plain or graded) rule against 8000-node composite Gauss-Legendre."""
    allowed = causal(2, 2, 20, pad=3)
    scores = random_scores(allowed, spread, seed=4)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed), exact=False)
    v = shares_like(allowed, 3, seed=5)
    panels = 1000 if spread < 1000 else 4000
    assert gap(integrated.apply(v), reference(scores, allowed, v, panels=panels)) <= 1e-6


def test_general_masks():
    """Sliding windows and random masks (no causal structure) against the reference."""
    n = 30
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = ((j <= i) & (j > i - 7)).expand(2, 3, n, n)
    gen = torch.Generator().manual_seed(6)
    scattered = torch.rand(1, 2, n, n, generator=gen) < 0.3
    scattered[..., 0, :] = False  # a row with no key
    for allowed in (window, scattered):
        scores = random_scores(allowed, 40.0, seed=7)
        pattern = softmax(scores, allowed)
        integrated = IntegratedSoftmax(scores, allowed, pattern)
        v = shares_like(allowed, 2, seed=8)
        assert gap(integrated.apply(v), reference(scores, allowed, v)) <= 1e-6
        moved = integrated.apply(integrated.scores.unsqueeze(1))[:, 0]
        torch.testing.assert_close(moved + integrated.remainder + integrated.uniform, pattern)


def test_symmetric_and_linear():
    allowed = causal(2, 3, 16, pad=2)
    scores = random_scores(allowed, 60.0, seed=9)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed))
    u, v = shares_like(allowed, 4, seed=10), shares_like(allowed, 4, seed=11)
    mu, mv = integrated.apply(u), integrated.apply(v)
    torch.testing.assert_close((mu * v).sum((0, 2, 3, 4)), (u * mv).sum((0, 2, 3, 4)))
    torch.testing.assert_close(integrated.apply(2.5 * u - 0.5 * v), 2.5 * mu - 0.5 * mv)
    # components are independent: M of one component alone equals its slice
    torch.testing.assert_close(integrated.apply(u[:, 1:2]), mu[:, 1:2])


def test_gradients_are_m():
    allowed = causal(1, 2, 12)
    scores = random_scores(allowed, 20.0, seed=12)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed), exact=False)
    u, g = shares_like(allowed, 2, seed=13), shares_like(allowed, 2, seed=14)
    leaf = u.clone().requires_grad_(True)
    zeros = integrated.gradient_path(leaf)
    assert not bool(zeros.any())
    (grad,) = torch.autograd.grad((zeros * g).sum(), leaf)
    torch.testing.assert_close(grad, integrated.apply(g))
    leaf = u.clone().requires_grad_(True)
    value = integrated.apply(leaf)
    torch.testing.assert_close(value.detach(), integrated.apply(u))
    (grad,) = torch.autograd.grad((value * g).sum(), leaf)
    torch.testing.assert_close(grad, integrated.apply(g))


def test_adjoint_rule_is_the_forward_rule():
    """``exact=False`` uses the same per-row rule (without the remainder)."""
    allowed = causal(2, 2, 18, pad=4)
    scores = random_scores(allowed, 150.0, seed=15)
    pattern = softmax(scores, allowed)
    exact = IntegratedSoftmax(scores, allowed, pattern)
    fast = IntegratedSoftmax(scores, allowed, pattern, exact=False)
    v = shares_like(allowed, 3, seed=16)
    # same rule and nodes; only the chunks may differ (rows moved by the doubling): a few eps
    torch.testing.assert_close(fast.apply(v), exact.apply(v), rtol=0, atol=1e-13)
    assert fast.n_nodes == exact.n_nodes and not bool(fast.remainder.any())
    torch.testing.assert_close(fast.uniform, exact.uniform)


def test_node_counts_follow_each_row():
    """Narrow rows get few nodes; wide rows a graded rule far below plain Gauss-Legendre's count;
    ``n_nodes`` is the largest count of any row."""
    allowed = causal(1, 2, 32)
    narrow = random_scores(allowed, 0.9, seed=17)
    integrated = IntegratedSoftmax(narrow, allowed, softmax(narrow, allowed))
    assert integrated.n_nodes <= 4
    wide = random_scores(allowed, 3000.0, seed=18)
    integrated = IntegratedSoftmax(wide, allowed, softmax(wide, allowed))
    assert 16 <= integrated.n_nodes <= 96 and integrated.error <= 1e-6
    # a layer of mixed rows: the narrow rows keep their small rules
    mixed = torch.cat([narrow[:, :1], wide[:, 1:]], dim=1)
    integrated = IntegratedSoftmax(mixed, allowed, softmax(mixed, allowed))
    totals = integrated._per_panel * integrated._panels
    assert totals.reshape(2, 32)[0].max() <= 4 and integrated.n_nodes == totals.max()


def test_forced_nodes_are_plain_gauss_legendre():
    allowed = causal(1, 2, 10)
    scores = random_scores(allowed, 25.0, seed=19)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed), nodes=12)
    assert integrated.n_nodes == 12
    alphas, weights = integrated_softmax.gauss_legendre(12, scores)
    v = shares_like(allowed, 2, seed=20)
    s = torch.where(allowed, scores, -torch.inf)
    want = torch.zeros_like(v)
    for alpha, weight in zip(alphas, weights):
        p = torch.softmax(alpha * s, -1).unsqueeze(1)
        want += weight * p * (v - (p * v).sum(-1, keepdim=True))
    torch.testing.assert_close(integrated.apply(v), want)


def test_rows_failing_the_tolerance_get_more_nodes():
    """With a tolerance the first rule cannot meet, the failing rows are doubled (not the layer),
    and the remainder stays exact bookkeeping."""
    allowed = causal(1, 2, 20)
    scores = random_scores(allowed, 30.0, seed=21)
    pattern = softmax(scores, allowed)
    first = IntegratedSoftmax(scores, allowed, pattern)
    strict = IntegratedSoftmax(scores, allowed, pattern, tolerance=1e-13)
    before = first._per_panel * first._panels
    after = strict._per_panel * strict._panels
    assert (after >= before).all() and (after > before).any() and (after == before).any()
    assert strict.error < first.error
    moved = strict.apply(strict.scores.unsqueeze(1))[:, 0]
    torch.testing.assert_close(moved + strict.remainder + strict.uniform, pattern)
    v = shares_like(allowed, 2, seed=22)
    assert gap(strict.apply(v), reference(scores, allowed, v)) <= 1e-9


def test_chunking_and_kept_patterns_do_not_change_m(monkeypatch):
    allowed = causal(2, 3, 40, pad=6)
    scores = random_scores(allowed, 50.0, seed=23)
    pattern = softmax(scores, allowed)
    v = shares_like(allowed, 5, seed=24)
    whole = IntegratedSoftmax(scores, allowed, pattern)
    monkeypatch.setitem(integrated_softmax.CHUNK_ELEMENTS, "cpu", 200)
    monkeypatch.setattr(integrated_softmax, "KEEP_PATTERNS_BYTES", 0)
    small = IntegratedSoftmax(scores, allowed, pattern)
    assert len(small._chunks) > 4 * len(whole._chunks)
    torch.testing.assert_close(small.apply(v), whole.apply(v), rtol=0, atol=1e-12)
    torch.testing.assert_close(small.remainder, whole.remainder, rtol=0, atol=1e-12)


def test_broadcast_mask_and_mixed_dtypes():
    """``allowed`` may be an expanded view; shares of another dtype keep their dtype."""
    allowed = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 3, 9, 9)
    scores = random_scores(allowed.clone(), 15.0, seed=25, dtype=torch.float32)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed))
    v = shares_like(allowed.clone(), 2, seed=26)
    out = integrated.apply(v)
    assert out.dtype == DOUBLE and integrated.uniform.shape == scores.shape
    assert gap(out, reference(scores, allowed, v)) <= 1e-5


@pytest.mark.parametrize("with_ratio", [False, True])
def test_contract_equals_the_dense_computation(with_ratio, monkeypatch):
    """``contract`` (no query x key tensor) against ``G = ratio * M(left right^T)`` built densely,
    with padding, several heads and prompts, and chunks that cross heads."""
    monkeypatch.setitem(integrated_softmax.CHUNK_ELEMENTS, "cpu", 3000)
    allowed = causal(2, 3, 26, pad=4)
    scores = random_scores(allowed, 40.0, seed=27)
    integrated = IntegratedSoftmax(scores, allowed, softmax(scores, allowed), exact=False)
    assert any(len(chunk.segments) > 1 for chunk in integrated._chunks)
    gen = torch.Generator().manual_seed(28)
    left, right, queries, keys = (
        torch.randn(2, 26, 3, d, generator=gen, dtype=DOUBLE) for d in (5, 5, 7, 7)
    )
    ratio = 0.5 + torch.rand(2, 3, 26, 26, generator=gen, dtype=DOUBLE) if with_ratio else None
    out_q, out_k = integrated.contract(left, right, queries, keys, ratio)
    dense = torch.einsum("bqhr,bkhr->bhqk", left, right) * allowed
    g = integrated.apply(dense.unsqueeze(1))[:, 0] * (ratio if with_ratio else 1.0)
    torch.testing.assert_close(out_q, torch.einsum("bhqk,bkhe->bqhe", g, keys))
    torch.testing.assert_close(out_k, torch.einsum("bhqk,bqhe->bkhe", g, queries))
