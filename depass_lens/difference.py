"""The difference linearisation: the model as an exact linear map of clean - corrupted changes.

DePass freezes each nonlinearity at its real value, which makes the model a linear map of the
*state*. To explain a *difference* between two runs (a clean prompt and a corrupted one, as edge
patching does), every nonlinearity is instead replaced by its exact secant between the two runs:

- an activation: ``act(g_x) - act(g_y) = r (g_x - g_y)`` with ``r`` the secant slope (the
  tangent where the two pre-activations coincide);
- a product (gated MLPs, ``pattern @ values``, ``q . k``): ``ab - a'b' = (a - a')(b + b')/2 +
  (a + a')/2 (b - b')``;
- a norm: ``x/s_x - y/s_y = d/s_x - y <d, x + y> / (n (s_x + s_y) s_x s_y)`` for the centred
  inputs and their difference ``d`` (exact: ``s_x^2 - s_y^2 = <x - y, x + y>/n``);
- the softmax: ``A_x - A_y = M(s_x - s_y)``, the softmax Jacobian integrated on the straight path
  from the corrupted scores to the clean ones (the quadrature's small remainder is recorded);
- an attention soft cap: its secant slope.

Constants are equal in both runs and cancel. The result is linear in the change of every node's
input and *exact* for the actual change: in a contrastive circuit graph each node's incoming edges
sum to its outgoing edges (up to the recorded quadrature remainder), and the direct edges sum to
the target's actual change. As elsewhere, values are never changed: each hook adds ``L(live) -
L(live).detach()``, so only gradients follow the secant map.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter, NormWeights
from depass_lens.constants import ConstantLedger, ConstantSite
from depass_lens.decomposition import score_mask
from depass_lens.errors import UnsupportedModelError
from depass_lens.integrated_softmax import IntegratedSoftmax
from depass_lens.norms import post_sublayer_norms
from depass_lens.pattern_gradient import PatternTerm
from depass_lens.recorders import (
    HookFn,
    first_copy,
    mlp_cut_hooks,
    pattern_of,
    store,
    store_frozen_pattern,
)
from depass_lens.saved_tensors import recompute_when_saved


def check_difference_supported(adapter: ModelAdapter) -> None:
    """Refuse settings whose secant this module does not follow (naming them)."""
    problems = []
    if adapter.is_moe:
        problems.append("mixture of experts (the routing itself differs between the two runs)")
    missing = [] if adapter.is_moe else _without_final_query_key_hooks(adapter)
    if missing:
        layers = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        why = (
            "the attention fires no hook after its rotary embedding: use_logn_attn, or a "
            "TransformerBridge attention class without post-rotary hooks"
            if adapter.positional == "rotary"
            else "a QK norm without rotary positions, or use_logn_attn"
        )
        problems.append(
            "the final queries and keys (what the attention scores are computed from) have no "
            f"hook point in layer(s) {layers} ({why}), so the secant of the scores cannot be "
            "formed"
        )
    if problems:
        raise UnsupportedModelError(
            "the difference linearisation cannot follow this model: "
            + "; ".join(problems)
            + ". Use linearisation='clean' (gradients of the clean run's linearisation)."
        )


def _without_final_query_key_hooks(adapter: ModelAdapter) -> list[int]:
    return [
        layer for layer in range(adapter.n_layers) if adapter.final_query_key_hooks(layer) is None
    ]


def norm_names(adapter: ModelAdapter) -> list[str]:
    """Every normalisation module with a scale hook (``blocks.0.ln1``, ..., ``ln_final``)."""
    return sorted(
        name.removesuffix(".hook_scale")
        for name in adapter.hook_names()
        if name.endswith(".hook_scale")
    )


def norm_statistics(adapter: ModelAdapter) -> list[str]:
    """Every norm's ``hook_scale`` and ``hook_normalized``: what a norm's secant reads of a run."""
    return [
        f"{norm}.{hook}"
        for norm in norm_names(adapter)
        for hook in ("hook_scale", "hook_normalized")
    ]


def query_key_hooks(adapter: ModelAdapter, layer: int) -> tuple[str, str]:
    """Where the final (rotated, normed) queries and keys of a layer are exposed."""
    hooks = adapter.final_query_key_hooks(layer)
    if hooks is None:  # refused by check_difference_supported before we get here
        raise UnsupportedModelError("this model's final queries and keys have no hook")
    return hooks


def reference_hooks(adapter: ModelAdapter) -> list[str]:
    """Activations of the corrupted run the difference linearisation reads."""
    check_difference_supported(adapter)
    names = norm_statistics(adapter)
    for layer in range(adapter.n_layers):
        prefix = f"blocks.{layer}"
        names += list(query_key_hooks(adapter, layer))
        names += [f"{prefix}.attn.hook_{h}" for h in ("v", "attn_scores", "pattern", "z")]
        if not adapter.attn_only:
            names += [f"{prefix}.mlp.hook_pre", f"{prefix}.mlp.hook_post"]
            mlp = adapter.mlp(layer)
            if mlp.gated:
                names.append(f"{prefix}.mlp.hook_pre_linear")
            if mlp.inner_norm is not None:
                names.append(f"{prefix}.mlp.hook_mid")
    return names


def secant_slope(act: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Float[Tensor, "*shape"]:
    """``(act(x) - act(y)) / (x - y)``, the central-difference tangent where ``x ~ y``.

    Half-precision inputs are taken in float32 (a step of ``1e-4`` vanishes in bfloat16)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return secant_slope(act, x.float(), y.float()).to(x.dtype)
    gap = x - y
    eps = 1e-9 if x.dtype == torch.float64 else 1e-4
    small = gap.abs() < eps
    slope = (act(x) - act(y)) / torch.where(small, torch.ones_like(gap), gap)
    if not bool(small.any()):
        return slope
    # the whole tensor, not the small entries alone: an activation need not be elementwise
    # (SoLU's softmax runs over the neurons)
    h = torch.full_like(x, eps)
    return torch.where(small, (act(x + h) - act(x - h)) / (2 * h), slope)


def secant_coefficient(
    normalized_x: Float[Tensor, "*batch d"],
    scale_x: Tensor,
    normalized_y: Float[Tensor, "*batch d"],
    scale_y: Tensor,
) -> Float[Tensor, "*batch d"]:
    """``(x + y) / (d (s_x + s_y))`` from both runs' normalised values and scales: the vector
    the secant of a norm's division takes its rank-one term along."""
    d = normalized_x.shape[-1]
    return (normalized_x * scale_x + normalized_y * scale_y) / (d * (scale_x + scale_y))


def secant_norm(
    delta: Float[Tensor, "*batch d"],
    normalized_x: Tensor,
    scale_x: Tensor,
    normalized_y: Tensor,
    scale_y: Tensor,
    norm: NormWeights,
) -> Float[Tensor, "*batch d"]:
    """The exact linear map from a change of a norm's input to the change of its output (with
    its weight; the bias cancels), given both runs' normalised values and scales."""
    if norm.centres:
        delta = delta - delta.mean(-1, keepdim=True)
    coef = secant_coefficient(normalized_x, scale_x, normalized_y, scale_y)
    out = delta / scale_x - normalized_y / scale_x * (delta * coef).sum(-1, keepdim=True)
    return out * norm.w if norm.w is not None else out


def secant_norm_transpose(
    grad: Float[Tensor, "*batch d"],
    normalized_x: Tensor,
    scale_x: Tensor,
    normalized_y: Tensor,
    scale_y: Tensor,
    norm: NormWeights,
) -> Float[Tensor, "*batch d"]:
    """The transpose of :func:`secant_norm`: pulls a gradient at the norm's output back to its
    input, through the same secant (``<secant_norm(d), g> == <d, secant_norm_transpose(g)>``)."""
    if norm.w is not None:
        grad = grad * norm.w
    coef = secant_coefficient(normalized_x, scale_x, normalized_y, scale_y)
    out = (grad - coef * (grad * normalized_y).sum(-1, keepdim=True)) / scale_x
    if norm.centres:  # the centring projection is symmetric
        out = out - out.mean(-1, keepdim=True)
    return out


def drop_rebuildable_patterns(adapter: ModelAdapter, reference: dict[str, Tensor]) -> None:
    """Remove from a corrupted run's activations every layer's pattern that is ``softmax`` of its
    scores bit for bit (:func:`~depass_lens.recorders.pattern_of`): the difference
    linearisation rebuilds it from the scores it keeps anyway, one layer at a time, so the run
    holds one ``query x key`` tensor per layer instead of two."""
    for layer in range(adapter.n_layers):
        pattern = f"blocks.{layer}.attn.hook_pattern"
        scores = reference.get(f"blocks.{layer}.attn.hook_attn_scores")
        if pattern in reference and scores is not None:
            if torch.equal(pattern_of(scores), reference[pattern]):
                del reference[pattern]


class DifferenceLinearisation:
    """TransformerLens hooks making the model (run on the clean input) the exact secant map of
    changes from a reference run (``reference``: its activations, recorded on split inputs when
    the clean run uses them). Same interface as :class:`~depass_lens.adjoint.Linearisation`."""

    def __init__(
        self,
        adapter: ModelAdapter,
        reference: Mapping[str, Tensor],
        ledger: ConstantLedger,
        nodes: int | None = None,
        replaced_mlps: Collection[int] = (),
        frozen_sides: Collection[str] = (),
        shared_rows: bool = False,
        release: Collection[str] = (),
    ):
        """``nodes`` forces a fixed quadrature on every row (default: per row, from the spread
        of its score change). ``replaced_mlps`` and ``frozen_sides`` as for
        :class:`~depass_lens.adjoint.Linearisation` (feature graphs). ``release``: reference
        activations the caller no longer needs, dropped from ``reference`` (then a dict) once
        read, so the pass never holds every layer's at once."""
        check_difference_supported(adapter)
        self.adapter = adapter
        self.reference = reference
        self.release = frozenset(release)
        self.ledger = ledger
        self.nodes = nodes
        self.replaced_mlps = frozenset(replaced_mlps)
        self.frozen_sides = frozenset(frozen_sides)
        self.shared_rows = shared_rows
        self.frozen: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for name in norm_names(self.adapter):
            hooks += [(f"{name}.hook_scale", self._scale), (f"{name}.hook_normalized", self._norm)]
        for layer in range(self.adapter.n_layers):
            hooks += self._attention(layer)
            if self.adapter.attn_only:
                continue
            if layer in self.replaced_mlps:
                hooks += mlp_cut_hooks(self.adapter.mlp(layer).gated, layer)
            else:
                hooks += self._mlp(layer)
        return hooks

    def _ref(self, name: str, like: Tensor) -> Tensor:
        """A reference activation, broadcast over a per-head axis the clean run may add (a
        pattern :func:`drop_rebuildable_patterns` dropped is rebuilt from its scores)."""
        if name not in self.reference and name.endswith(".attn.hook_pattern"):
            scores = self.reference[name.removesuffix("hook_pattern") + "hook_attn_scores"]
            rebuild = partial(pattern_of, scores)
            return recompute_when_saved(rebuild(), rebuild, made=True).to(like.dtype)
        value = self.reference[name].to(like.dtype)
        if name in self.release:
            del self.reference[name]  # type: ignore[attr-defined]
        if value.shape != like.shape and value.ndim == like.ndim - 1:
            value = value.unsqueeze(2).expand_as(like)
        return value

    # ------------------------------------------------------------------ norms
    def _scale(self, value: Tensor, hook) -> Tensor:
        frozen = value.detach()
        self.frozen[hook.name] = frozen
        return frozen

    def _norm(self, value: Tensor, hook) -> Tensor:
        """At ``hook_normalized`` (``x / s_x``, ``s_x`` frozen): add the secant's second term."""
        base = hook.name.removesuffix(".hook_normalized")
        scale_x = self.frozen[f"{base}.hook_scale"]
        normalized_x = value.detach()
        normalized_y = self._ref(hook.name, value)
        scale_y = self._ref(f"{base}.hook_scale", scale_x)
        coef = secant_coefficient(normalized_x, scale_x, normalized_y, scale_y)
        extra = -normalized_y * (value * coef).sum(-1, keepdim=True)
        return value + (extra - extra.detach())

    # ------------------------------------------------------------------ MLPs
    def _mlp(self, layer: int) -> list[tuple[str, HookFn]]:
        mlp = self.adapter.mlp(layer)
        prefix = f"blocks.{layer}.mlp"
        live: dict[str, Tensor] = {}

        def secant(value: Tensor, hook) -> Tensor:
            gate = live["gate"]
            gate_x, gate_y = gate.detach(), self._ref(f"{prefix}.hook_pre", gate)
            slope = secant_slope(mlp.act_fn, gate_x, gate_y)
            if mlp.gated:
                up = live["up"]
                up_x, up_y = up.detach(), self._ref(f"{prefix}.hook_pre_linear", up)
                act_mean = (mlp.act_fn(gate_x) + mlp.act_fn(gate_y)) / 2
                along_gate = slope * (up_x + up_y) / 2  # one coefficient kept for the backward
                linear = along_gate * gate + act_mean * up
                change = along_gate * (gate_x - gate_y) + act_mean * (up_x - up_y)
            else:
                linear = slope * gate
                change = slope * (gate_x - gate_y)
            out = value.detach() + (linear - linear.detach())
            real = value.detach() - self._ref(hook.name, value)
            name = f"{hook.name}.secant_remainder"
            self.ledger.add(ConstantSite(name, hook.name, "mlp", layer, out, real - change, -1))
            live.clear()  # the pre-activations are not needed past this layer
            return out

        hooks: list[tuple[str, HookFn]] = [(f"{prefix}.hook_pre", store(live, "gate"))]
        if mlp.gated:
            hooks.append((f"{prefix}.hook_pre_linear", store(live, "up")))
        value_hook = f"{prefix}.hook_mid" if mlp.inner_norm is not None else f"{prefix}.hook_post"
        hooks.append((value_hook, secant))
        return hooks

    # ------------------------------------------------------------------ attention
    def _attention(self, layer: int) -> list[tuple[str, HookFn]]:
        """``z_x - z_y = A_bar dv + dA v_bar`` with ``dA = M(ds)`` and ``ds`` the symmetric
        product rule on the final queries and keys (times the soft cap's secant)."""
        adapter = self.adapter
        prefix = f"blocks.{layer}.attn"
        q_hook, k_hook = query_key_hooks(adapter, layer)
        seen: dict[str, Tensor] = {}

        def steer(z: Tensor, hook) -> Tensor:
            scale = adapter.qk(layer).attn_scale
            repeat = adapter.attention(layer).kv_repeat
            q, k, v = seen["q"], seen["k"], seen["v"]
            q_y, k_y = self._ref(q_hook, q), self._ref(k_hook, k)
            v_y = self._ref(f"{prefix}.hook_v", v)
            if repeat > 1:
                k, v, k_y, v_y = (torch.repeat_interleave(t, repeat, 2) for t in (k, v, k_y, v_y))
            q_x, k_x, v_x = q.detach(), k.detach(), v.detach()
            ratio = None
            cap = adapter.attn_scores_soft_cap
            if cap > 0:
                raw_x = einops.einsum(q_x, k_x, "b i h e, b j h e -> b h i j") / scale
                raw_y = einops.einsum(q_y, k_y, "b i h e, b j h e -> b h i j") / scale
                ratio = secant_slope(lambda t: cap * torch.tanh(t / cap), raw_x, raw_y)
            scores_x = seen["scores"]
            allowed = score_mask(scores_x)  # -inf or an additive finfo.min mask
            scores_y = self._ref(f"{prefix}.hook_attn_scores", scores_x)
            one = partial(first_copy, shared_rows=self.shared_rows)
            integrated = IntegratedSoftmax(
                one(scores_x),
                one(allowed),
                one(seen["pattern"]),
                self.nodes,
                exact=False,
                start=one(scores_y),
                keep_patterns=self.shared_rows,
            )
            pattern_x = seen["pattern"].to(v.dtype)
            pattern_y = self._ref(f"{prefix}.hook_pattern", pattern_x)
            v_mean = (v_x + v_y) / 2
            # the value side: A_bar v - A_x v (TL's own z mixes v by A_x)
            y_v = einops.einsum(pattern_y, v, "b h q k, b k h d -> b q h d")
            correction = (y_v - z) / 2
            holder = self.ledger.computed(f"{prefix}.path_remainder", hook.name, "attn", layer)
            term = PatternTerm(
                integrated=integrated,
                values=one(v_mean),
                queries=one((q_x + q_y) / 2),
                keys=one((k_x + k_y) / 2),
                weight_q=1.0,
                weight_k=1.0,
                scale=scale,
                weight=1.0,
                ratio=None if ratio is None else one(ratio),
                moved_values=einops.einsum(
                    one(pattern_x - pattern_y), one(v_mean), "b h q k, b k h d -> b q h d"
                ),
                query_offset=one(q_y - q_x),
                key_offset=one(k_y - k_x),
                on_constants=holder.append,
            )
            live_q = q.detach() if "q" in self.frozen_sides else q  # one class of paths
            live_k = k.detach() if "k" in self.frozen_sides else k
            correction = correction + term.apply(live_q, live_k)
            seen.clear()  # what autograd needs it keeps (the pattern as a recipe, if it can)
            return z + (correction - correction.detach())

        return [
            (q_hook, store(seen, "q")),
            (k_hook, store(seen, "k")),
            (f"{prefix}.hook_v", store(seen, "v")),
            (f"{prefix}.hook_attn_scores", store(seen, "scores", frozen=True)),
            (
                f"{prefix}.hook_pattern",
                store_frozen_pattern(seen, "pattern", "scores", shared_rows=self.shared_rows),
            ),
            (f"{prefix}.hook_z", steer),
        ]


def difference_outputs(
    adapter: ModelAdapter,
    clean: Mapping[str, Tensor],
    corrupt: Mapping[str, Tensor],
    layer: int,
    which: str,
    before: Tensor,
) -> Tensor:
    """Send sublayer-output changes (before its post-norms) through the post-norms' secants."""
    for norm in post_sublayer_norms(adapter, layer, which):  # type: ignore[arg-type]
        assert norm.scale_hook is not None
        base = norm.scale_hook.removesuffix(".hook_scale")
        stats = [clean[f"{base}.hook_normalized"], clean[norm.scale_hook]]
        stats += [corrupt[f"{base}.hook_normalized"], corrupt[norm.scale_hook]]
        n_x, s_x, n_y, s_y = (s.unsqueeze(1) if s.ndim == before.ndim - 1 else s for s in stats)
        before = secant_norm(before, n_x, s_x, n_y, s_y, norm)
    return before
