"""Adjoint mode: every component's score from one forward and one backward pass per target.

With a linear MLP rule (``taylor``) the decomposed pass is a fixed linear map of the initial
components plus a constant. So a component's share of a scalar target equals ``<grad, component>``,
where ``grad`` is the gradient of the target with respect to the start hook on the
*frozen-linearised* model: norm scales and attention patterns detached, and each MLP activation
replaced by its frozen ratio ``act(g)/g`` (or the chosen gated side). We get that graph by
running the real ``HookedTransformer`` with TransformerLens hooks that detach exactly those
quantities; the values of the forward pass are unchanged. This path shares no propagation code
with forward mode, which makes their agreement (a standing test) an independent check of both.

The constant term is not ``value - <grad, x>``: every constant the linearised model adds is
recorded where it enters (a :class:`~depass_lens.constants.ConstantLedger`) and scored by its own
gradient, so completeness is a real check. With ``split_inputs`` the same pass runs on
TransformerLens's per-head query/key/value inputs and a separate MLP input: the gradient at each
of them is the gradient through that one node's input, which is what circuit edges need.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import MLPWeights, ModelAdapter
from depass_lens.constants import (
    ConstantLedger,
    ConstantSite,
    mlp_input_constants,
    output_constant,
    value_constant,
)
from depass_lens.decomposition import compute_dtype, score_mask
from depass_lens.difference import DifferenceLinearisation
from depass_lens.frozen import refuse_non_finite
from depass_lens.integrated_softmax import IntegratedSoftmax
from depass_lens.pattern_gradient import PatternTerm
from depass_lens.qk import (
    SIDE_WEIGHTS,
    AttentionSplit,
    LayerQK,
    attention_input,
    layer_qk,
    norm_scale_of,
    project,
    project_constant,
)
from depass_lens.recorders import (
    HookFn,
    first_copy,
    mlp_cut_hooks,
    one_row_shared,
    store,
    store_frozen_pattern,
)
from depass_lens.rules import NeuronValues, TaylorRule
from depass_lens.saved_tensors import lean_saved_tensors


@dataclass
class AdjointPass:
    """Result of one linearised forward: detached activations and a way to take gradients."""

    activations: dict[str, Tensor]  # detached copies of every stored hook
    live: dict[str, Tensor]  # the same tensors, still in the graph
    batch: int
    ledger: ConstantLedger = field(default_factory=ConstantLedger)

    def backward(
        self,
        scalar: Tensor,
        hooks: Iterable[str],
        retain_graph: bool,
        zeros_for_unused: bool = True,
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Gradients at the named hooks (zeros, or ``None`` if asked, where the target does not
        depend on them), and every constant site's share of ``scalar``."""
        names = list(dict.fromkeys(hooks))
        for site in self.ledger.sites:  # computed sites are refilled by this backward pass
            if site.computed is not None:
                site.computed.clear()
        tensors = [self.live[name] for name in names] + self.ledger.live_tensors()
        grads = torch.autograd.grad(scalar, tensors, retain_graph=retain_graph, allow_unused=True)
        named = {
            name: grad if grad is not None or not zeros_for_unused else torch.zeros_like(tensor)
            for name, grad, tensor in zip(names, grads, tensors)
        }
        with torch.no_grad():
            constants = self.ledger.contributions(grads[len(names) :], self.batch)
        return named, constants

    def gradients(
        self, scalar: Tensor, hooks: Iterable[str], retain_graph: bool
    ) -> dict[str, Tensor]:
        return self.backward(scalar, hooks, retain_graph)[0]


class Linearisation:
    """TransformerLens forward hooks that turn the model into its frozen-linearised version.

    Values are unchanged (each replaced activation is ``value.detach() + L(live) - L(live)
    .detach()``), gradients are those of the linear map, and every constant is recorded in
    ``ledger``. ``frozen`` collects the detached real values the hooks freeze.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        rule: TaylorRule,
        split: AttentionSplit | None,
        attention_mask: Tensor | None,
        ledger: ConstantLedger,
        n_pos: int,
        split_inputs: bool = False,
        replaced_mlps: Collection[int] = (),
        frozen_sides: Collection[str] = (),
        shared_rows: bool = False,
    ):
        self.adapter = adapter
        self.n_pos = n_pos
        self.rule = rule
        self.split = split
        self.attention_mask = attention_mask
        self.ledger = ledger
        self.split_inputs = split_inputs
        self.replaced_mlps = frozenset(replaced_mlps)
        self.frozen_sides = frozenset(frozen_sides)
        self.shared_rows = shared_rows
        self.frozen: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        adapter = self.adapter
        hooks: list[tuple[str, HookFn]] = []
        for name in adapter.frozen_hook_names():
            if name.endswith(("hook_scale", "hook_pattern", "hook_expert_weights")):
                hooks.append((name, self._freeze))
        for layer in range(adapter.n_layers):
            if self.split is not None and self.split.uses_pattern:
                hooks += self._pattern_hooks(layer)
            hooks += self._attention_constant_hooks(layer)
            if adapter.attn_only:
                continue
            if layer in self.replaced_mlps:  # a dictionary replaces it: cut, nothing kept
                hooks += [] if adapter.is_moe else mlp_cut_hooks(adapter.mlp(layer).gated, layer)
            else:
                hooks += self._mlp_hooks(layer)
        return hooks

    # ------------------------------------------------------------------ helpers
    def _freeze(self, value: Tensor, hook) -> Tensor:
        frozen = value.detach()
        if self.shared_rows and hook.name.endswith("hook_pattern"):
            return one_row_shared(frozen)
        if hook.name.endswith("hook_scale"):  # what output constants read; patterns are not kept
            self.frozen[hook.name] = frozen
        return frozen

    def _site(
        self,
        name: str,
        owner,
        layer: int,
        constant_of: Callable[[Tensor], Tensor | None],
        axis: int | None = None,
    ) -> HookFn:
        """A hook that records ``constant_of(value)`` as a constant inside the hooked tensor."""

        def fn(value: Tensor, hook) -> None:
            constant = constant_of(value)
            if constant is not None:
                self.ledger.add(ConstantSite(name, hook.name, owner, layer, value, constant, axis))

        return fn

    # ------------------------------------------------------------------ attention
    def _attention_constant_hooks(self, layer: int) -> list[tuple[str, HookFn]]:
        """``b_V`` (and the input norm's bias through ``W_V``) per head; ``b_O`` as it joins the
        stream (through any post-attention norm), which belongs to no head."""
        adapter = self.adapter
        prefix = f"blocks.{layer}"

        def b_out(value: Tensor) -> Tensor:
            bias = adapter.attention(layer).b_O.expand_as(value)
            return output_constant(adapter, layer, "attn", self.frozen, bias)

        return [
            (
                f"{prefix}.attn.hook_v",
                self._site(
                    f"{prefix}.attn.b_V", "attn", layer, lambda v: value_constant(adapter, layer), 2
                ),
            ),
            (f"{prefix}.hook_attn_out", self._site(f"{prefix}.attn.b_O", "stream", layer, b_out)),
        ]

    def _pattern_hooks(self, layer: int) -> list[tuple[str, HookFn]]:
        """Pattern-side split on the real model: ``z`` keeps its value, its gradient follows the
        split.

        Queries and keys are rebuilt from the live attention input with frozen norm scales (the
        QK path of :mod:`depass_lens.qk`); at ``hook_z`` the term ``(P_v - A) v + w_p M(s) v_real``
        is added and subtracted (value zero), so ``v`` is mixed by the split's value pattern
        ``P_v`` and the scores reach the output through ``M`` (whose forward value is never
        needed, so only its backward pass is computed). The score shares' constants and the
        quadrature remainder ``A - U - M(s)`` are recorded as this head's constants.
        """
        adapter = self.adapter
        split = self.split
        assert split is not None
        prefix = f"blocks.{layer}.attn"
        input_hook = adapter.attention_input_hook(layer)
        seen: dict[str, Tensor] = {}

        def remember(key: str, frozen: bool = False) -> HookFn:
            return store(seen, key, frozen)

        final = adapter.final_query_key_hooks(layer)  # TransformerLens's own live q and k

        def steer(z: Tensor, hook) -> Tensor:
            scores = seen[f"{prefix}.hook_attn_scores"]
            allowed = score_mask(scores)  # -inf or an additive finfo.min mask
            pattern = seen.pop(f"{prefix}.hook_pattern").to(scores.dtype)  # autograd may rebuild it
            one = partial(first_copy, shared_rows=self.shared_rows)
            integrated = IntegratedSoftmax(
                one(scores),
                one(allowed),
                one(pattern),
                split.nodes,
                exact=False,
                keep_patterns=self.shared_rows,
            )
            v = seen[f"{prefix}.hook_v"]
            kv_repeat = adapter.attention(layer).kv_repeat
            if kv_repeat > 1:
                v = torch.repeat_interleave(v, kv_repeat, dim=2)
            if final is not None:
                queries, keys = seen["q"], seen["k"]
                if keys.shape[2] != queries.shape[2]:  # grouped keys, per query head
                    keys = torch.repeat_interleave(keys, queries.shape[2] // keys.shape[2], 2)
                q_real, k_real = queries.detach(), keys.detach()
            else:  # rebuilt from the live attention input (frozen norm scales)
                real = self._real_qk(layer, seen)
                x_query, x_key = self._live_attention_inputs(layer, seen, real)
                queries, keys = self._projections(real, x_query, x_key)
                q_real, k_real = real.q, real.k
            weight = split.pattern_weight
            uniform_v = self._uniform_values(layer, integrated, v)
            # the value side: P_v v - A v = w (U - A) v for both pattern-side splits
            correction = weight * (uniform_v - z)
            zero_q, zero_k = self._constant_projections(layer, q_real, seen)
            holder = self.ledger.computed(f"{prefix}.pattern_constants", hook.name, "attn", layer)
            w_query, w_key = SIDE_WEIGHTS["symmetric"]
            term = PatternTerm(
                integrated=integrated,
                values=one(v.detach()),
                queries=one(q_real),
                keys=one(k_real),
                weight_q=w_query,
                weight_k=w_key,
                scale=adapter.qk(layer).attn_scale,
                weight=weight,
                ratio=self._cap_ratio(layer, one(q_real), one(k_real)),
                moved_values=one(z.detach() - uniform_v.detach()),  # (A - U) v_real
                query_offset=one(zero_q - q_real),
                key_offset=one(zero_k - k_real),
                on_constants=holder.append,
            )
            if "q" in self.frozen_sides:  # a path class without query-side pattern moves
                queries = queries.detach()
            if "k" in self.frozen_sides:
                keys = keys.detach()
            correction = correction + term.apply(queries, keys)
            return z + (correction - correction.detach()).to(z.dtype)  # float32 terms: half z

        if self.split_inputs:
            inputs = [f"blocks.{layer}.hook_q_input", f"blocks.{layer}.hook_k_input"]
            inputs.append(f"blocks.{layer}.hook_resid_pre")
        else:
            inputs = [input_hook]
        hooks: list[tuple[str, HookFn]] = [(name, remember(name)) for name in inputs]
        hooks += [
            (f"{prefix}.hook_v", remember(f"{prefix}.hook_v")),
            (f"{prefix}.hook_attn_scores", remember(f"{prefix}.hook_attn_scores", frozen=True)),
        ]
        for name in adapter.qk_hook_names(layer):
            if name.endswith("hook_scale") or name == "hook_pos_embed":
                hooks.append((name, remember(name, frozen=name.endswith("hook_scale"))))
        ln1 = adapter.block_norms(layer)["ln1"]
        if self.split_inputs and ln1 is not None and ln1.scale_hook is not None:
            hooks.append((ln1.scale_hook, remember(ln1.scale_hook, frozen=True)))
        if final is not None:
            hooks += [(final[0], remember("q")), (final[1], remember("k"))]
        scores_of = f"{prefix}.hook_attn_scores"
        hooks += [
            (
                f"{prefix}.hook_pattern",
                store_frozen_pattern(
                    seen, f"{prefix}.hook_pattern", scores_of, shared_rows=self.shared_rows
                ),
            ),
            (f"{prefix}.hook_z", steer),
        ]
        return hooks

    def _uniform_values(
        self, layer: int, integrated: IntegratedSoftmax, v: Float[Tensor, "batch key head d"]
    ) -> Float[Tensor, "batch query head d"]:
        """``U v``: the mean of the values each query may see. A running mean where the mask is
        plain causal (no padding, no local window), else the uniform pattern times ``v``."""
        if self.attention_mask is None and not self.adapter.local_attention(layer):
            counts = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
            return v.cumsum(1) / counts.view(1, -1, 1, 1)
        uniform = integrated.uniform.to(v.dtype)
        uniform = uniform.expand(v.shape[0], *uniform.shape[1:])  # one prompt, shared rows
        return einops.einsum(uniform, v, "b h q k, b k h d -> b q h d")

    def _cap_ratio(self, layer: int, queries: Tensor, keys: Tensor) -> Tensor | None:
        """A soft cap's frozen ratio ``cap tanh(raw / cap) / raw`` (``None`` without a cap)."""
        cap = self.adapter.attn_scores_soft_cap
        if cap <= 0:
            return None
        raw = einops.einsum(queries, keys, "b i h e, b j h e -> b h i j")
        raw = raw / self.adapter.qk(layer).attn_scale
        safe = torch.where(raw == 0, torch.ones_like(raw), raw)
        return torch.where(raw == 0, torch.ones_like(raw), cap * torch.tanh(raw / cap) / safe)

    def _constant_projections(
        self, layer: int, like: Tensor, seen: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Queries and keys of an all-zero stream: what the constants (input norm bias,
        projection biases, shortformer positions) make of them, QK norm and rotary included."""
        adapter = self.adapter
        qk = adapter.qk(layer)
        batch, n_pos = like.shape[:2]
        prefix = f"blocks.{layer}.attn"
        scales: list[Tensor | None] = [None, None]
        if qk.norm_style != "none":
            scales = [
                norm_scale_of(seen[f"{prefix}.{n}_norm.hook_scale"], batch, n_pos, qk.norm_style)
                for n in ("q", "k")
            ]
        if adapter.positional == "shortformer":  # positions differ: one product per position
            zeros = like.new_zeros(batch, 1, n_pos, adapter.d_model)
            one = like.new_ones(1, 1, 1, 1)
            pos = seen["hook_pos_embed"].detach()
            x = attention_input(adapter, layer, zeros, one, pos)[:, 0]
            ones = like.new_ones(batch)
            return (
                project(qk, x, "q", ones, scales[0], self.attention_mask),
                project(qk, x, "k", ones, scales[1], self.attention_mask),
            )
        norm = adapter.attention_input_norm(layer)
        constant = norm.b if norm is not None else None
        return (
            project_constant(qk, constant, "q", (batch, n_pos), scales[0], self.attention_mask),
            project_constant(qk, constant, "k", (batch, n_pos), scales[1], self.attention_mask),
        )

    def _real_qk(self, layer: int, seen: dict[str, Tensor]) -> LayerQK:
        """The real QK quantities of ``layer`` from the values the hooks have seen so far."""
        adapter = self.adapter
        real_acts = {name: value.detach() for name, value in seen.items()}
        if self.split_inputs:  # the shared (not per-head) normalised input, from resid_pre
            resid = real_acts[f"blocks.{layer}.hook_resid_pre"]
            real_acts[adapter.attention_input_hook(layer)] = self._normalise(layer, resid, seen)
        return layer_qk(adapter, layer, real_acts, self.attention_mask)

    def _normalise(self, layer: int, x: Tensor, seen: dict[str, Tensor]) -> Tensor:
        """The frozen input norm's linear part (no weight) on ``x`` (``batch pos *head d``)."""
        adapter = self.adapter
        if adapter.attention_input_hook(layer).endswith("hook_resid_pre"):
            return x
        ln1 = adapter.block_norms(layer)["ln1"]
        assert ln1 is not None and ln1.scale_hook is not None
        scale = seen[ln1.scale_hook].detach()
        scale = scale[:, :, 0] if scale.ndim == 4 else scale  # per-head copies agree
        if x.ndim == 4:
            scale = scale.unsqueeze(-1)
        if ln1.centres:
            x = x - x.mean(-1, keepdim=True)
        return (x / scale).to(x.dtype)  # divided in the wider dtype (float32 scale)

    def _live_attention_inputs(
        self, layer: int, seen: dict[str, Tensor], real: LayerQK
    ) -> tuple[Tensor, Tensor | None]:
        """What queries and keys read on the live graph (one shared input, or one per head)."""
        one = real.q.new_ones(1, 1, 1, 1)
        if not self.split_inputs:
            live = seen[self.adapter.attention_input_hook(layer)]
            x = attention_input(self.adapter, layer, live.unsqueeze(1), one, real.pos_embed)
            return x, None
        inputs = []
        for side in ("q", "k"):
            live = self._normalise(layer, seen[f"blocks.{layer}.hook_{side}_input"], seen)
            inputs.append(
                attention_input(self.adapter, layer, live.unsqueeze(1), one, real.pos_embed)
            )
        return inputs[0], inputs[1]

    def _projections(
        self, real: LayerQK, x_query: Tensor, x_key: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Queries and keys (rotated, QK-normed with frozen scales, keys repeated per head) of
        one-component attention inputs ``[batch, 1, pos, (head,) d_model]``."""
        batch = x_query.shape[0]
        ones = x_query.new_ones(batch)
        q_scale, k_scale = real.scales_for(1)
        mask = real.mask_for(1)
        queries = project(real.weights, x_query[:, 0], "q", ones, q_scale, mask)
        key_input = x_query if x_key is None else x_key
        keys = project(real.weights, key_input[:, 0], "k", ones, k_scale, mask)
        return queries, keys

    # ------------------------------------------------------------------ MLP
    def _mlp_hooks(self, layer: int) -> list[tuple[str, HookFn]]:
        """Linearising hooks for one layer's MLP (or each expert), with its constants."""
        adapter = self.adapter
        prefix = f"blocks.{layer}.mlp"
        hooks: list[tuple[str, HookFn]] = []
        if adapter.is_moe:
            hooks += self._mixture_hooks(layer)
            out_bias = None
        else:
            mlp = adapter.mlp(layer)
            gate_const, up_const = mlp_input_constants(adapter, layer, mlp)
            for hook_name, constant in (("hook_pre", gate_const), ("hook_pre_linear", up_const)):
                if constant is not None:
                    hooks.append((f"{prefix}.{hook_name}", self._fixed(layer, constant, axis=-1)))
            post = f"{prefix}.hook_mid" if mlp.inner_norm is not None else f"{prefix}.hook_post"
            up = f"{prefix}.hook_pre_linear" if mlp.gated else None
            hooks += self._activation_hooks(f"{prefix}.hook_pre", up, post, mlp, layer)
            inner = mlp.inner_norm
            if inner is not None and inner.b is not None:
                hooks.append((f"{prefix}.hook_post", self._fixed(layer, inner.b, axis=-1)))
            out_bias = mlp.b_out

        def b_out(value: Tensor) -> Tensor:
            bias = out_bias.expand_as(value) if out_bias is not None else torch.zeros_like(value)
            return output_constant(adapter, layer, "mlp", self.frozen, bias)

        hooks.append(
            (f"blocks.{layer}.hook_mlp_out", self._site(f"{prefix}.b_out", "mlp", layer, b_out))
        )
        return hooks

    def _mixture_hooks(self, layer: int) -> list[tuple[str, HookFn]]:
        """Each expert linearised; its rows are routed tokens, so the frozen routing tells which
        prompt each row belongs to (TransformerLens's own routing order)."""
        adapter = self.adapter
        prefix = f"blocks.{layer}.mlp"
        moe = adapter.moe(layer)
        rows: dict[int, Tensor] = {}

        def routing(value: Tensor, hook) -> None:
            top = value.detach().topk(moe.experts_per_token, dim=-1).indices
            mask = torch.nn.functional.one_hot(top, len(moe.experts)).permute(2, 1, 0)
            for index in range(len(moe.experts)):
                _, tokens = torch.where(mask[index])
                rows[index] = tokens

        hooks: list[tuple[str, HookFn]] = [(moe.weights_hook, routing)]
        for index, expert in enumerate(moe.experts):
            name = f"{prefix}.experts.{index}"
            gate_const, up_const = mlp_input_constants(adapter, layer, expert)

            def batch_of(index: int = index) -> Tensor:
                return torch.div(rows[index], self.n_pos, rounding_mode="floor")

            for hook_name, constant in (("hook_gate", gate_const), ("hook_pre", up_const)):
                if constant is not None:
                    hooks.append((f"{name}.{hook_name}", self._fixed(layer, constant, batch_of)))
            gate, up, post = (f"{name}.hook_{h}" for h in ("gate", "pre", "post"))
            hooks += self._activation_hooks(gate, up, post, expert, layer, batch_of)
        return hooks

    def _fixed(
        self,
        layer: int,
        constant: Tensor,
        batch_of: Callable[[], Tensor] | None = None,
        axis: int | None = None,
    ) -> HookFn:
        """A hook recording a fixed MLP constant inside the hooked tensor (rows routed: MoE)."""

        def fn(value: Tensor, hook) -> None:
            rows = batch_of() if batch_of is not None else None
            site = ConstantSite(hook.name, hook.name, "mlp", layer, value, constant, axis, rows)
            self.ledger.add(site)

        return fn

    def _activation_hooks(
        self,
        gate_hook: str,
        up_hook: str | None,
        value_hook: str,
        mlp: MLPWeights,
        layer: int,
        batch_of: Callable[[], Tensor] | None = None,
    ) -> list[tuple[str, HookFn]]:
        """Store the live pre-activations, then replace the activation by its linearisation.

        The replacement is ``value.detach() + L(live) - L(live).detach()``: its value is the real
        one, its gradient that of the linear map ``L`` (frozen ratio times each share). What ``L``
        misses of the real value (a gated MLP's ``b_in``, the near-zero remainder) is a constant.
        """
        rule = self.rule
        live: dict[str, Tensor] = {}

        def linearise(value: Tensor, hook) -> Tensor:
            gate = live["gate"]
            if up_hook is not None:
                up = live["up"]
                g, u = gate.detach(), up.detach()
                act = mlp.act_fn(g)
                r = rule.ratio(NeuronValues(g, act, act * u, u, mlp.act_fn))
                gate_side = r * u * gate
                up_side = act * up
                linear = {
                    "gate": gate_side,
                    "up": up_side,
                    "symmetric": 0.5 * (gate_side + up_side),
                }[rule.side]
            else:
                g = gate.detach()
                values = NeuronValues(g, value.detach(), value.detach(), None, mlp.act_fn)
                linear = rule.ratio(values) * gate
            out = value.detach() + (linear - linear.detach())
            remainder = value.detach() - linear.detach()
            rows = batch_of() if batch_of is not None else None
            axis = None if rows is not None else -1  # per neuron, except routed expert rows
            name = f"{hook.name}.remainder"
            self.ledger.add(ConstantSite(name, hook.name, "mlp", layer, out, remainder, axis, rows))
            live.clear()  # the pre-activations are not needed past this layer
            return out

        hooks: list[tuple[str, HookFn]] = [(gate_hook, store(live, "gate"))]
        if up_hook is not None:
            hooks.append((up_hook, store(live, "up")))
        hooks.append((value_hook, linearise))
        return hooks


def linearised_forward(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    rule: TaylorRule,
    store: Iterable[str],
    stop_at_layer: int | None = None,
    split: AttentionSplit | None = None,
    *,
    split_inputs: bool = False,
    per_head: bool = True,
    linearise: bool = True,
    embed_override: Tensor | None = None,
    reference: Mapping[str, Tensor] | None = None,
    replaced_mlps: Collection[int] = (),
    frozen_sides: Collection[str] = (),
    extra_hooks: Sequence[tuple[str, HookFn]] = (),
    shared_rows: bool = False,
    release: Collection[str] = (),
) -> AdjointPass:
    """Run the frozen-linearised model once, keeping the named activations (live and detached).

    The unembedding is never applied (targets read ``unembed.hook_in`` and only their own columns of
    ``W_U``), which saves the ``d_vocab``-wide matmul of a plain forward. ``split_inputs`` runs on
    per-head query/key/value inputs and a separate MLP input (see
    :meth:`~depass_lens.adapter.ModelAdapter.split_inputs`), whose hooks may then be stored;
    ``per_head=False`` splits the MLPs' inputs only (heads read their shared input).
    ``linearise=False`` keeps the real model (its true gradients, for gradient baselines such as
    edge attribution patching); ``embed_override`` replaces the token embeddings (e.g. points on
    a path between two inputs, for integrated gradients). ``reference`` (a corrupted run's
    activations) swaps the frozen linearisation for the exact secant map of changes from that run
    (:class:`~depass_lens.difference.DifferenceLinearisation`).

    Feature graphs: ``replaced_mlps`` are MLPs a dictionary replaces (not linearised, nothing of
    them kept); ``frozen_sides`` (``"q"``, ``"k"``) cut a pattern split's query or key path, so
    the gradient follows one class of paths; ``extra_hooks`` run right after the linearising
    hooks (the replacement's own); ``shared_rows``: every row of ``tokens`` is the same prompt
    (one receiver per row), so the pattern side's frozen quantities are formed once.
    ``release``: ``reference`` activations to drop once read (see
    :class:`~depass_lens.difference.DifferenceLinearisation`).
    """
    wanted = set(store)
    live: dict[str, Tensor] = {}
    ledger = ConstantLedger()

    def leaf(value: Tensor, hook) -> Tensor:
        if hook.name == "hook_embed" and embed_override is not None:
            value = embed_override.to(value.dtype)
        value = value.detach().requires_grad_(True)
        if hook.name in wanted:
            live[hook.name] = value
        return value

    def keep(value: Tensor, hook) -> None:
        live[hook.name] = value

    linearisation: Linearisation | DifferenceLinearisation
    if reference is not None:
        nodes = split.nodes if split is not None else None
        linearisation = DifferenceLinearisation(
            adapter, reference, ledger, nodes, replaced_mlps, frozen_sides, shared_rows, release
        )
    else:
        linearisation = Linearisation(
            adapter,
            rule,
            split,
            attention_mask,
            ledger,
            tokens.shape[1],
            split_inputs=split_inputs and per_head,
            replaced_mlps=replaced_mlps,
            frozen_sides=frozen_sides,
            shared_rows=shared_rows,
        )
    fwd_hooks: list[tuple[str | Callable, Callable]] = []
    if linearise:
        fwd_hooks += linearisation.hooks()
    fwd_hooks += list(extra_hooks)
    fwd_hooks.append(("hook_embed", leaf))
    if adapter.positional in ("standard", "shortformer"):
        fwd_hooks.append(("hook_pos_embed", leaf))
    # Stored after linearisation hooks so the stored value is what flows on.
    fwd_hooks += [(name, keep) for name in wanted if name not in ("hook_embed", "hook_pos_embed")]
    n_layers = adapter.n_layers if stop_at_layer is None else stop_at_layer
    context = adapter.split_inputs(per_head) if split_inputs else nullcontext()
    with torch.enable_grad(), lean_saved_tensors(), context, adapter.hooks(fwd_hooks):
        resid = adapter.stream(tokens, attention_mask, n_layers)
        if stop_at_layer is None and "unembed.hook_in" in wanted:
            final = adapter.apply_final_norm(resid)
            live["unembed.hook_in"] = final
            final_norm = adapter.final_norm()
            if linearise and reference is None and final_norm.b is not None:
                site = ConstantSite(
                    "ln_final.b", "unembed.hook_in", "final", adapter.n_layers, final, final_norm.b
                )
                ledger.add(site)
    missing = wanted - set(live)
    if missing:
        raise RuntimeError(f"adjoint pass did not produce {sorted(missing)}")
    activations = {k: v.detach() for k, v in live.items()}
    refuse_non_finite(adapter, activations, tokens, attention_mask)  # a broken model state
    return AdjointPass(activations, live, tokens.shape[0], ledger)


def target_scalar(
    state: Float[Tensor, "batch pos *d"],
    weights: Float[Tensor, "batch pos *d"],
    constant: Float[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``<weights, state> + constant`` per prompt (in float32 for a half-precision state)."""
    wide = compute_dtype(state.dtype)
    product = state.to(wide) * weights.to(wide)
    return product.flatten(1).sum(-1) + constant.to(wide)  # any trailing shape (hook_z)


__all__ = ["AdjointPass", "Linearisation", "linearised_forward", "target_scalar"]
