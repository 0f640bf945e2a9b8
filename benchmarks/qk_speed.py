"""A/B timing of the integrated softmax: the previous scheme against the current one, one process.

The previous scheme (one Gauss-Legendre rule per layer, sized by the widest row, evaluated on the
full ``query x key`` square, one softmax and five elementwise passes per node) is kept here only,
as ``OldIntegratedSoftmax``. For each prompt length the script times one ``run_with_cache`` and the
QK-aware adjoint case ``adjoint_all_qk`` (``benchmarks/cases.py``) with each scheme, interleaved,
and reports the minimum over the repeats, the ratios to ``run_with_cache``, and how much of each
run the integrated softmax itself took (its constructor and ``M`` together)::

    python -m benchmarks.qk_speed --n-pos 128 512 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import depass_lens.adjoint as adjoint_module
import depass_lens.integrated_softmax as new_module
import depass_lens.propagate as propagate_module
from benchmarks.cases import build, make_case


class OldIntegratedSoftmax:
    """The integrated softmax as it was before the per-row quadrature (for comparison only)."""

    NODES_FOR_SPREAD = ((10.0, 8), (40.0, 16), (160.0, 32), (640.0, 64), (2560.0, 128))

    def __init__(
        self,
        scores: Tensor,
        allowed: Tensor,
        pattern: Tensor,
        nodes: int | None = None,
        tolerance: float = 1e-6,
        exact: bool = True,
    ):
        self.scores = torch.where(allowed, scores, torch.zeros_like(scores))
        self.allowed = allowed
        self._mask = torch.where(allowed, 0.0, -torch.inf).to(scores.dtype)
        self._empty_rows = not bool(allowed.any(-1).all())
        self.uniform = self._pattern(torch.zeros((), dtype=scores.dtype, device=scores.device))
        self._patterns: Tensor | None = None
        if not exact:
            count = nodes if nodes is not None else self._node_counts(scores, allowed)[0]
            self.alphas, self.weights = new_module.gauss_legendre(count, scores)
            self.remainder = torch.zeros_like(self.uniform)
            self.error = float("nan")
            return
        target = pattern.to(scores.dtype) - self.uniform
        scale = target.abs().max().clamp_min(torch.finfo(scores.dtype).tiny)
        counts = [nodes] if nodes is not None else self._node_counts(scores, allowed)
        for count in counts:
            self.alphas, self.weights = new_module.gauss_legendre(count, scores)
            self._patterns = None
            remainder = target - self._apply(self.scores.unsqueeze(1))[:, 0]
            self.error = float(remainder.abs().max() / scale)
            if self.error <= tolerance:
                break
        self.remainder = remainder
        if self.alphas.numel() * scores.numel() * scores.element_size() <= 128 * 2**20:
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

    def apply(self, shares: Tensor) -> Tensor:
        if shares.requires_grad:
            return _OldFn.apply(shares, self, True)  # type: ignore[no-any-return]
        return self._apply(shares)

    def gradient_path(self, shares: Tensor) -> Tensor:
        return _OldFn.apply(shares, self, False)  # type: ignore[no-any-return]

    def _node_counts(self, scores: Tensor, allowed: Tensor) -> list[int]:
        high = torch.where(allowed, scores, torch.full_like(scores, -torch.inf)).amax(-1)
        low = torch.where(allowed, scores, torch.full_like(scores, torch.inf)).amin(-1)
        spreads = (high - low)[allowed.any(-1)]
        spread = float(spreads.max()) if spreads.numel() else 0.0
        first = next((n for limit, n in self.NODES_FOR_SPREAD if spread <= limit), 256)
        return [n for n in (8, 16, 32, 64, 128, 256) if n >= first]


class _OldFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, shares: Tensor, integrated: Any, value: bool) -> Tensor:
        ctx.integrated = integrated
        return integrated._apply(shares) if value else torch.zeros_like(shares)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.integrated._apply(grad), None, None


def timed_class(cls: type, clock: dict[str, float]) -> type:
    """``cls`` with its constructor and ``_apply`` timed into ``clock["softmax"]``."""

    class Timed(cls):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any):
            start = time.perf_counter()
            super().__init__(*args, **kwargs)
            clock["softmax"] += time.perf_counter() - start
            clock["nodes"] = max(clock["nodes"], self.n_nodes)

        def _apply(self, shares: Tensor) -> Tensor:
            start = time.perf_counter()
            out = super()._apply(shares)
            clock["softmax"] += time.perf_counter() - start
            return out

    return Timed


def use(cls: type) -> None:
    adjoint_module.IntegratedSoftmax = cls  # type: ignore[attr-defined]
    propagate_module.IntegratedSoftmax = cls  # type: ignore[attr-defined]


def best_of(fn: Callable[[], Any], clock: dict[str, float]) -> tuple[float, float]:
    """Seconds of one call and of the integrated softmax inside it."""
    clock["softmax"] = 0.0
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, clock["softmax"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--n-pos", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build(args.config)
    clock = {"softmax": 0.0, "nodes": 0}
    schemes = {
        "old": timed_class(OldIntegratedSoftmax, clock),
        "new": timed_class(new_module.IntegratedSoftmax, clock),
    }
    print(f"{args.config}, {torch.get_num_threads()} threads; minimum of {args.repeats} runs")
    print("tokens | run_with_cache s | scheme | adjoint_all_qk s | ratio | M s | nodes")
    for n_pos in args.n_pos:
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model.cfg.d_vocab, (1, n_pos), generator=gen)
        forward, _ = make_case("forward", model, tokens)
        qk, _ = make_case("adjoint_all_qk", model, tokens)
        forward()
        times: dict[str, list[tuple[float, float]]] = {"forward": [], "old": [], "new": []}
        nodes = {}
        for name, cls in schemes.items():  # warm-up
            use(cls)
            clock["nodes"] = 0
            qk()
            nodes[name] = clock["nodes"]
        for _ in range(args.repeats):
            times["forward"].append(best_of(forward, clock))
            for name, cls in schemes.items():
                use(cls)
                times[name].append(best_of(qk, clock))
        use(new_module.IntegratedSoftmax)
        base = min(t for t, _ in times["forward"])
        for name in schemes:
            total = min(t for t, _ in times[name])
            inner = min(m for _, m in times[name])
            print(
                f"{n_pos} | {base:.3f} | {name} | {total:.3f} | {total / base:.2f}x | "
                f"{inner:.3f} | {nodes[name]}"
            )
        old, new = (min(t for t, _ in times[k]) for k in ("old", "new"))
        print(f"{n_pos} | speed-up of adjoint_all_qk: {old / new:.2f}x")


if __name__ == "__main__":
    main()
