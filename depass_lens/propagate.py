"""Forward mode: push a decomposition through the rest of the model, nonlinearities frozen.

:class:`DecomposedTransformer` mirrors the module tree of a ``HookedTransformer``
(``blocks.L.attn``, ``blocks.L.mlp``, ``ln_final``, ...), so its hook points carry
TransformerLens's own names. Each activation has an extra ``comp`` axis after ``batch``.
``run_with_hooks`` and ``run_with_cache`` work on it as on the model: caching the decomposed
stream, or zeroing one component mid-pass, uses the hook machinery users already know.

The engine knows nothing of tokens or heads: sources only choose the starting decomposition.

A half-precision model's stream is propagated in float32 (:func:`~depass_lens.decomposition.
compute_dtype`): each weight is cast as it is used, the frozen quantities are the model's own
half-precision values, and the losslessness checks compare with its half-precision activations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm import tqdm
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from depass_lens.adapter import MLPWeights, ModelAdapter, NormWeights
from depass_lens.decomposition import HALF_DTYPES, Decomposition, compute_dtype
from depass_lens.errors import DePassInputError
from depass_lens.frozen import FrozenActivations
from depass_lens.integrated_softmax import IntegratedSoftmax
from depass_lens.norms import frozen_norm_linear
from depass_lens.qk import AttentionSplit, LayerQK, layer_qk, score_shares
from depass_lens.rules import MLPRule, NeuronValues

Stream = Float[Tensor, "batch comp pos d_model"]
Checker = Callable[[str, Tensor], None]


@dataclass
class PropagationContext:
    """Everything one decomposed run needs besides the starting decomposition."""

    adapter: ModelAdapter
    frozen: FrozenActivations
    rule: MLPRule
    chunk_size: int | None = None
    checker: Checker | None = None
    progress: bool = False
    attention: AttentionSplit = field(default_factory=AttentionSplit)
    attention_mask: Tensor | None = None
    memo: dict = field(default_factory=dict)  # per-layer QK quantities, shared by all chunks

    def qk(self, layer: int) -> tuple[LayerQK, IntegratedSoftmax | None]:
        """The real QK quantities of ``layer`` (and the integrated softmax for the pattern side)."""
        if layer not in self.memo:
            real = layer_qk(self.adapter, layer, self.frozen, self.attention_mask)
            integrated = None
            if self.attention.uses_pattern:
                model_pattern = self.frozen.pattern(layer)
                pattern = model_pattern.to(real.scores.dtype)
                rounding = _pattern_rounding(real, pattern, model_pattern.dtype)
                if rounding is not None:  # integrate to the unrounded pattern, then add it back
                    pattern = pattern - rounding
                integrated = IntegratedSoftmax(
                    real.scores, real.allowed, pattern, self.attention.nodes
                )
                if rounding is not None:
                    integrated.remainder.add_(rounding)  # A - U - M(s), A as the model rounded it
            self.memo[layer] = (real, integrated)
        return self.memo[layer]


def _pattern_rounding(real: LayerQK, pattern: Tensor, model_dtype: torch.dtype) -> Tensor | None:
    """A half-precision model's pattern less the float32 softmax of its own scores.

    The model rounds its pattern to ``eps / 2``; no quadrature reaches below that, so
    the integrated softmax would refine every row to its node limit in vain. It integrates to
    the unrounded softmax instead, and the rounding joins its remainder (the ``bias``).
    ``None`` for float32 and float64 models (their softmax is the pattern itself).
    """
    if model_dtype not in HALF_DTYPES:
        return None
    exact = torch.softmax(real.scores, dim=-1)
    exact = torch.where(real.allowed, torch.nan_to_num(exact), 0.0)
    return pattern - exact


def chunk_slices(n_comp: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``(offset, length)`` pairs covering ``range(n_comp)`` in chunks of ``chunk_size``."""
    size = n_comp if not chunk_size or chunk_size >= n_comp else chunk_size
    return [(start, min(size, n_comp - start)) for start in range(0, n_comp, size)]


def bias_indicator(offset: int, length: int, n_comp: int, like: Tensor) -> Tensor:
    """``[1, length, 1, 1]`` with a one at the global bias index (the last component), if inside."""
    index = torch.arange(offset, offset + length, device=like.device)
    return (index == n_comp - 1).to(like.dtype).view(1, -1, 1, 1)


def _any_hooks(*points: HookPoint) -> bool:
    return any(p.has_hooks() for p in points)


class DecomposedNorm(nn.Module):
    """A norm with its scale frozen: centre (LN only), divide by the real scale, weight, bias."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_normalized = HookPoint()  # [batch, comp, pos, d]

    def forward(
        self,
        x: Stream,
        norm: NormWeights | None,
        ctx: PropagationContext,
        is_bias: Tensor | None = None,
    ) -> Stream:
        """``is_bias`` marks the bias component inside a chunk (default: the last component)."""
        if norm is None or norm.kind == "none":
            return x
        scale = ctx.frozen.scale(norm.scale_hook)
        assert scale is not None
        x = self.hook_normalized(frozen_norm_linear(x, norm, scale))
        if norm.w is not None:
            x = x * norm.w
        if norm.b is not None:
            if is_bias is None:
                is_bias = bias_indicator(0, x.shape[1], x.shape[1], x)
            x = x + is_bias * norm.b
        return x


Prepare = Callable[[Tensor, Tensor], Tensor]  # (chunk of components, is_bias) -> chunk


def _keep(x: Tensor, is_bias: Tensor) -> Tensor:
    return x


class DecomposedAttention(nn.Module):
    """Attention with the real pattern: each component's values are mixed, then projected by W_O.

    With a pattern-side :class:`~depass_lens.qk.AttentionSplit`, each component also receives its
    share of the pattern's move away from uniform (``hook_pattern``), computed from its share of
    the scores (``hook_attn_scores``); see :mod:`depass_lens.qk`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_v = HookPoint()  # [batch, comp, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, comp, head, query, key] score shares
        self.hook_pattern = HookPoint()  # [batch, comp, head, query, key] pattern shares
        self.hook_z = HookPoint()  # [batch, comp, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, comp, pos, head, d_model]

    def _mix(
        self,
        part: Stream,
        v: Float[Tensor, "batch comp pos head d_head"],
        pattern: Float[Tensor, "batch head query key"],
        layer: int,
        ctx: PropagationContext,
        is_bias: Tensor,
    ) -> Float[Tensor, "batch comp pos head d_head"]:
        """``z_c``: the values mixed by the pattern, plus (pattern side) the pattern shares."""
        split = ctx.attention
        if not split.uses_pattern and not self.hook_attn_scores.has_hooks():
            return einops.einsum(
                pattern, v, "batch head query key, batch comp key head d -> batch comp query head d"
            )
        real, integrated = ctx.qk(layer)
        x = part
        if real.pos_embed is not None:  # shortformer: positions join queries and keys only
            x = x + is_bias * real.pos_embed.unsqueeze(1).to(x.dtype)
        shares = self.hook_attn_scores(score_shares(real, x, is_bias))
        if integrated is None:
            return einops.einsum(pattern, v, "b h q k, b c k h d -> b c q h d")
        bias = is_bias.unsqueeze(-1)
        uniform = integrated.uniform.unsqueeze(1).to(part.dtype)
        moved = integrated.apply(shares) + bias * integrated.remainder.unsqueeze(1).to(part.dtype)
        moved = self.hook_pattern(moved + bias * uniform) - bias * uniform  # sums to the pattern
        weights = ctx.adapter.attention(layer)
        v_real = ctx.frozen[f"blocks.{layer}.attn.hook_v"].to(part.dtype)
        if weights.kv_repeat > 1:
            v_real = torch.repeat_interleave(v_real, weights.kv_repeat, dim=2)
        mixing = split.value_pattern(pattern, integrated.uniform.to(pattern.dtype))
        own = einops.einsum(mixing, v, "b h q k, b c k h d -> b c q h d")
        steered = einops.einsum(moved, v_real, "b c h q k, b k h d -> b c q h d")
        return own + split.pattern_weight * steered

    def forward(self, part: Stream, layer: int, ctx: PropagationContext, is_bias: Tensor) -> Stream:
        """One chunk of (normalised) components; ``is_bias`` marks the bias component in it."""
        weights = ctx.adapter.attention(layer)
        pattern = ctx.frozen.pattern(layer).to(part.dtype)
        v = einops.einsum(
            part,
            weights.W_V.to(part.dtype),
            "batch comp pos d_model, head d_model d_head -> batch comp pos head d_head",
        )
        v = v + is_bias.unsqueeze(-1) * weights.b_V
        if weights.kv_repeat > 1:
            v = torch.repeat_interleave(v, weights.kv_repeat, dim=3)
        v = self.hook_v(v)
        z = self.hook_z(self._mix(part, v, pattern, layer, ctx, is_bias))
        W_O = weights.W_O.to(z.dtype)
        if self.hook_result.has_hooks():
            result = self.hook_result(
                einops.einsum(
                    z,
                    W_O,
                    "batch comp pos head d_head, head d_head d_model -> "
                    "batch comp pos head d_model",
                )
            )
            out = result.sum(dim=3)
        else:
            out = einops.einsum(
                z,
                W_O,
                "batch comp pos head d_head, head d_head d_model -> batch comp pos d_model",
            )
        return out + is_bias * weights.b_O


class DecomposedMLP(nn.Module):
    """MLP whose neuron values are split among components by the rule, then projected by W_out."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_pre = HookPoint()  # [batch, comp, pos, d_mlp] (gate side for gated MLPs)
        self.hook_pre_linear = HookPoint()  # [batch, comp, pos, d_mlp] (gated MLPs only)
        self.hook_mid = HookPoint()  # [batch, comp, pos, d_mlp] (SoLU-LN only)
        self.hook_post = HookPoint()  # [batch, comp, pos, d_mlp]
        self.ln = DecomposedNorm()

    def hook_points_inside(self) -> tuple[HookPoint, ...]:
        return (
            self.hook_pre,
            self.hook_pre_linear,
            self.hook_mid,
            self.hook_post,
            self.ln.hook_normalized,
        )

    def neuron_values(self, layer: int, ctx: PropagationContext) -> NeuronValues:
        mlp = ctx.adapter.mlp(layer)
        gate = ctx.frozen.mlp(layer, "pre")
        if mlp.gated:
            up = ctx.frozen.mlp(layer, "pre_linear")
            act = mlp.act_fn(gate)
            return NeuronValues(gate, act, act * up, up, mlp.act_fn)
        act = ctx.frozen.mlp(layer, "mid" if mlp.inner_norm is not None else "post")
        return NeuronValues(gate, act, act, None, mlp.act_fn)

    def _shares(
        self, part: Stream, is_bias: Tensor, mlp: MLPWeights, hooks: bool
    ) -> tuple[Tensor, Tensor | None]:
        pre_hook = self.hook_pre if hooks else _identity
        if mlp.W_gate is not None:
            gate = einops.einsum(part, mlp.W_gate.to(part.dtype), "b c p d, d n -> b c p n")
            up = einops.einsum(part, mlp.W_in.to(part.dtype), "b c p d, d n -> b c p n")
            return pre_hook(gate), (self.hook_pre_linear if hooks else _identity)(up)
        pre = einops.einsum(part, mlp.W_in.to(part.dtype), "b c p d, d n -> b c p n")
        return pre_hook(pre + is_bias * mlp.b_in), None

    def forward(
        self,
        x: Stream,
        layer: int,
        ctx: PropagationContext,
        slices: list[tuple[int, int]],
        prepare: Prepare = _keep,
        finish: Prepare = _keep,
    ) -> Stream:
        """The MLP's decomposed output; ``prepare``/``finish`` apply the frozen norms per chunk."""
        if ctx.adapter.is_moe:
            return self._mixture(x, layer, ctx, slices, prepare, finish)
        values = self.neuron_values(layer, ctx)
        return self._dense(x, ctx.adapter.mlp(layer), values, ctx, slices, prepare, finish)

    def _mixture(self, x, layer, ctx, slices, prepare, finish) -> Stream:
        """Mixture of experts: the router's weights are frozen; each expert is a gated MLP.

        An expert's real pre-activations are those of the real input (the sum of the components);
        its output, split by the rule, is scaled by the frozen routing weight of each position.
        Expert-internal hook points are not exposed (``hook_mlp_out`` is).
        """
        routing = ctx.frozen.routing(layer).to(x.dtype)
        real = prepare(x.sum(dim=1, keepdim=True), torch.ones_like(x[:1, :1, :1, :1]))[:, 0]
        out = torch.zeros_like(x)
        for index, expert in enumerate(ctx.adapter.moe(layer).experts):
            weight = routing[..., index]
            if not bool((weight != 0).any()):
                continue
            assert expert.W_gate is not None
            gate = real @ expert.W_gate.to(real.dtype)
            up = real @ expert.W_in.to(real.dtype)
            act = expert.act_fn(gate)
            values = NeuronValues(gate, act, act * up, up, expert.act_fn)
            part = self._dense(x, expert, values, ctx, slices, prepare, _keep, hooks=False)
            out += part * weight[:, None, :, None]
        return finish(out, bias_indicator(0, x.shape[1], x.shape[1], x))

    def _dense(
        self,
        x: Stream,
        mlp: MLPWeights,
        values: NeuronValues,
        ctx: PropagationContext,
        slices: list[tuple[int, int]],
        prepare: Prepare,
        finish: Prepare,
        hooks: bool = True,
    ) -> Stream:
        """Split each neuron's value among the components chunk by chunk, then project by W_out.

        A non-linear rule first reduces statistics over every chunk (``reduce_passes`` passes),
        recomputing each chunk's shares rather than keeping them all.
        """
        n_comp = x.shape[1]
        rule = ctx.rule
        state = None
        cached: dict[int, tuple[Tensor, Tensor | None]] = {}

        def shares_of(offset: int, length: int) -> tuple[Tensor, Tensor | None]:
            if offset in cached:
                return cached[offset]
            is_bias = bias_indicator(offset, length, n_comp, x)
            shares = self._shares(
                prepare(x[:, offset : offset + length], is_bias), is_bias, mlp, hooks
            )
            if len(slices) == 1:
                cached[offset] = shares
            return shares

        for stage in range(0 if rule.linear else rule.reduce_passes):  # statistics first
            for offset, length in slices:
                state = rule.reduce(state, shares_of(offset, length)[0], offset, n_comp, stage)
        output = x.new_empty(x.shape) if len(slices) > 1 else None
        for offset, length in slices:
            gate, up = shares_of(offset, length)
            cached.pop(offset, None)
            post = rule.split(state, gate, up, values, offset, n_comp)
            is_bias = bias_indicator(offset, length, n_comp, post)
            if mlp.inner_norm is not None:  # SoLU-LN: split act(pre), then the frozen inner LN
                post = self.ln(self.hook_mid(post), mlp.inner_norm, ctx, is_bias)
            if mlp.gated:
                post = post + is_bias * mlp.b_in
            if hooks:
                post = self.hook_post(post)
            W_out = mlp.W_out.to(post.dtype)
            out = einops.einsum(post, W_out, "b c p n, n d -> b c p d") + is_bias * mlp.b_out
            out = finish(out, is_bias)
            if output is None:
                return out
            output[:, offset : offset + length] = out
        assert output is not None
        return output


def _identity(x: Tensor) -> Tensor:
    return x


class DecomposedBlock(nn.Module):
    """One transformer block on decomposed streams, with TransformerLens's block hook points.

    Each sublayer (norm, attention or MLP, post-norm) runs chunk by chunk over the components into
    one output tensor, so memory stays near two copies of the stream plus one chunk. Residual
    additions happen in place when no hook can hold the tensor being added to.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.ln1 = DecomposedNorm()
        self.ln1_post = DecomposedNorm()
        self.attn = DecomposedAttention()
        self.hook_attn_out = HookPoint()
        if adapter.has_resid_mid:
            self.hook_resid_mid = HookPoint()
        if not adapter.attn_only:
            self.ln2 = DecomposedNorm()
            self.ln2_post = DecomposedNorm()
            self.mlp = DecomposedMLP()
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def _norm_fns(
        self,
        pre: DecomposedNorm,
        post: DecomposedNorm,
        which: tuple[str, str],
        ctx: PropagationContext,
        layer: int,
    ) -> tuple[Prepare, Prepare]:
        """Per-chunk functions for the norm before a sublayer and the norm(s) after it."""
        norms = ctx.adapter.block_norms(layer)
        before, after = norms[which[0]], norms[which[1]]
        if ctx.adapter.post_norm:  # OLMo 2/3: the norm acts on the sublayer's output
            before, extra_after = None, before
        else:
            extra_after = None

        def prepare(part: Tensor, is_bias: Tensor) -> Tensor:
            return pre(part, before, ctx, is_bias)

        def finish(part: Tensor, is_bias: Tensor) -> Tensor:
            if extra_after is not None:
                part = pre(part, extra_after, ctx, is_bias)
            return post(part, after, ctx, is_bias)

        return prepare, finish

    def _slices(
        self, ctx: PropagationContext, n_comp: int, *points: HookPoint
    ) -> list[tuple[int, int]]:
        hooked = _any_hooks(*points)
        return chunk_slices(n_comp, None if hooked else ctx.chunk_size)

    def _attention(self, x: Stream, layer: int, ctx: PropagationContext) -> Stream:
        prepare, finish = self._norm_fns(self.ln1, self.ln1_post, ("ln1", "ln1_post"), ctx, layer)
        n_comp = x.shape[1]
        slices = self._slices(
            ctx,
            n_comp,
            self.ln1.hook_normalized,
            self.ln1_post.hook_normalized,
            self.attn.hook_v,
            self.attn.hook_attn_scores,
            self.attn.hook_pattern,
            self.attn.hook_z,
            self.attn.hook_result,
        )
        output = x.new_empty(x.shape) if len(slices) > 1 else None
        for offset, length in slices:
            is_bias = bias_indicator(offset, length, n_comp, x)
            part = prepare(x[:, offset : offset + length], is_bias)
            part = finish(self.attn(part, layer, ctx, is_bias), is_bias)
            if output is None:
                return self.hook_attn_out(part)
            output[:, offset : offset + length] = part
        return self.hook_attn_out(output)

    def _mlp(self, x: Stream, layer: int, ctx: PropagationContext) -> Stream:
        prepare, finish = self._norm_fns(self.ln2, self.ln2_post, ("ln2", "ln2_post"), ctx, layer)
        slices = self._slices(
            ctx,
            x.shape[1],
            self.ln2.hook_normalized,
            self.ln2_post.hook_normalized,
            *self.mlp.hook_points_inside(),
        )
        return self.hook_mlp_out(self.mlp(x, layer, ctx, slices, prepare, finish))

    @staticmethod
    def _add(x: Stream, out: Stream, owned: bool) -> Stream:
        """``x + out``, in place when nobody else can hold ``x``."""
        return x.add_(out) if owned else x + out

    def forward(
        self, x: Stream, layer: int, start: str, ctx: PropagationContext, owned: bool = False
    ) -> Stream:
        """Run the block from ``start`` (pre or mid); ``owned``: ``x`` is the engine's tensor."""
        adapter = ctx.adapter
        check = ctx.checker or (lambda name, value: None)
        if start == "pre":
            x = self.hook_resid_pre(x)
            check(f"blocks.{layer}.hook_resid_pre", x)
            owned = owned and not self.hook_resid_pre.has_hooks()
            if adapter.parallel:
                mlp_out = self._mlp(x, layer, ctx)
                attn_out = self._attention(x, layer, ctx)
                x = self._add(self._add(x, attn_out, owned), mlp_out, True)
            else:
                x = self._add(x, self._attention(x, layer, ctx), owned)
                if adapter.has_resid_mid:
                    x = self.hook_resid_mid(x)
                    check(f"blocks.{layer}.hook_resid_mid", x)
                    start = "mid"
            owned = True
        elif start == "mid":
            x = self.hook_resid_mid(x)
            check(f"blocks.{layer}.hook_resid_mid", x)
        if start == "mid":
            owned = owned and not self.hook_resid_mid.has_hooks()
            x = self._add(x, self._mlp(x, layer, ctx), owned)
        x = self.hook_resid_post(x)
        check(f"blocks.{layer}.hook_resid_post", x)
        return x


class DecomposedUnembed(nn.Module):
    """Holds ``unembed.hook_in``: the final-norm output, the stream the unembedding reads."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_in = HookPoint()  # [batch, comp, pos, d_model]


_START = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


def parse_start(hook: str, adapter: ModelAdapter) -> tuple[int, str]:
    """Map a start hook name to ``(layer, stage)``; ``stage`` is embed, pre, mid or post."""
    if hook == "hook_embed":
        return 0, "embed"
    match = _START.match(hook)
    if match is None:
        raise DePassInputError(
            f"a decomposition can start at 'hook_embed' or 'blocks.L.hook_resid_pre/mid/post', not "
            f"{hook!r}"
        )
    layer, stage = int(match.group(1)), match.group(2)
    if not 0 <= layer < adapter.n_layers:
        raise DePassInputError(
            f"layer {layer} is out of range: the model has layers 0..{adapter.n_layers - 1}"
        )
    if stage == "mid" and not adapter.has_resid_mid:
        raise DePassInputError(
            f"{hook!r} does not exist in this model (parallel attention or attention-only)"
        )
    return layer, stage


class DecomposedTransformer(HookedRootModule):
    """The decomposed forward pass, as a hookable module with TransformerLens's hook names.

    It holds no weights (it reads them through the adapter), so it never copies the model. Call it
    with a :class:`Decomposition` and a :class:`PropagationContext`; it returns the decomposed
    final-norm output (``unembed.hook_in``), ``batch comp pos d_model``.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        object.__setattr__(self, "adapter", adapter)  # not a submodule: no weight copies
        self.cfg = adapter.cfg  # lets ActivationCache resolve ("resid_post", -1) style keys
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(DecomposedBlock(adapter) for _ in range(adapter.n_layers))
        self.ln_final = DecomposedNorm()
        self.unembed = DecomposedUnembed()
        self.setup()

    def forward(self, decomposition: Decomposition, ctx: PropagationContext) -> Stream:
        adapter = ctx.adapter
        rule = ctx.rule.bind(decomposition.labels)  # a rule may depend on the component order
        if rule is not ctx.rule:
            ctx = replace(ctx, rule=rule)
        layer, stage = parse_start(decomposition.hook, adapter)
        dtype = compute_dtype(decomposition.components.dtype)  # float32 for half models
        x = decomposition.components.to(dtype)
        owned = False  # the input belongs to the caller: never modified in place
        if stage == "embed":
            x = self.hook_embed(x)
            if decomposition.pos_components is not None:
                pos = self.hook_pos_embed(decomposition.pos_components.to(dtype))
                if adapter.positional == "standard":
                    x, owned = x + pos, True
            stage = "pre"
        elif stage == "post":  # the start hook itself fires, then the next block
            first: DecomposedBlock = self.blocks[layer]  # type: ignore[assignment]
            x = first.hook_resid_post(x)
            layer, stage = layer + 1, "pre"
        layers = range(layer, adapter.n_layers)
        if ctx.progress:  # shown only if the run takes more than a couple of seconds
            layers = tqdm(layers, desc="DePass layers", leave=False, delay=2.0)
        for index in layers:
            block: DecomposedBlock = self.blocks[index]  # type: ignore[assignment]
            x = block(x, index, stage, ctx, owned)
            owned = not block.hook_resid_post.has_hooks()
            stage = "pre"
        x = self.ln_final(x, adapter.final_norm(), ctx)
        return self.unembed.hook_in(x)
