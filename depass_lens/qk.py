"""The QK circuit with frozen norms: queries, keys, and each component's share of a score.

A pre-softmax attention score is bilinear in the attention input: ``s[i, j] = q_i . k_j / scale``.
With the norm scales frozen (``ln1`` and any QK norm) and rotary being linear, ``q`` and ``k`` are
affine in the input, so a decomposition of the input gives each component ``c`` a *query-side*
share ``q_c,i . k_j`` (real keys), a *key-side* share ``q_i . k_c,j`` (real queries), and their
average, the *symmetric* share; each kind sums over components to the real score. An attention
soft cap is linearised by its frozen ratio, and whatever TransformerLens adds to the scores besides
``q . k`` (ALiBi) goes to ``bias``, so the shares sum to ``hook_attn_scores`` exactly.

The same projections serve the :class:`~depass_lens.targets.AttentionScore` target (where a head
looks, attributed to any source) and the pattern side of :class:`AttentionSplit` (credit through
the pattern, not only through the values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter, NormWeights, QKWeights
from depass_lens.decomposition import compute_dtype, unmasked
from depass_lens.errors import DePassInputError
from depass_lens.frozen import Activations

ScoreSide = Literal["query", "key", "symmetric"]
#: Weights of the query-side and key-side shares for each kind of score share.
SIDE_WEIGHTS: dict[str, tuple[float, float]] = {
    "query": (1.0, 0.0),
    "key": (0.0, 1.0),
    "symmetric": (0.5, 0.5),
}


def _frozen_qk_norm(
    y: Float[Tensor, "n pos head d_head"],
    norm: NormWeights | None,
    style: str,
    scale: Tensor | None,
    is_bias: Tensor,
) -> Float[Tensor, "n pos head d_head"]:
    """A QK norm with its real scale frozen: linear in ``y`` (its bias, if any, to ``bias``)."""
    if norm is None or scale is None:
        return y
    heads = y.shape[2]
    if style == "full":
        y = einops.rearrange(y, "n pos head d -> n pos (head d)")
    if norm.centres:
        y = y - y.mean(-1, keepdim=True)
    y = (y / scale).to(y.dtype)  # the division in the wider of the two (a float32 scale)
    if norm.w is not None:
        y = y * norm.w
    if norm.b is not None:
        y = y + is_bias.view(-1, *([1] * (y.ndim - 1))) * norm.b
    if style == "full":
        y = einops.rearrange(y, "n pos (head d) -> n pos head d", head=heads)
    return y


def project(
    qk: QKWeights,
    x: Float[Tensor, "n pos d_model"] | Float[Tensor, "n pos head d_model"],
    which: Literal["q", "k"],
    is_bias: Float[Tensor, " n"],
    norm_scale: Tensor | None,
    attention_mask: Int[Tensor, "n pos"] | None,
) -> Float[Tensor, "n pos head d_head"]:
    """Rotated queries or keys of attention inputs ``x`` (rows may be components of one state).

    ``x`` is one input for all heads, or one per head (TransformerLens's split q/k/v inputs, with
    grouped-query attention ungrouped). ``is_bias`` marks the rows that receive the projection's
    bias; ``norm_scale`` is the frozen QK norm scale, broadcastable to ``[n, pos, head, 1]`` (per
    head) or ``[n, pos, 1]`` (full vector). Rotary and log-n scaling are TransformerLens's own
    (both linear). Keys come out repeated to ``n_heads`` (grouped-query attention).
    """
    W, b = (qk.W_Q, qk.b_Q) if which == "q" else (qk.W_K, qk.b_K)
    W = W.to(x.dtype)  # a half model's weights on float32 components
    if x.ndim == 4:  # one input per head
        y = einops.einsum(x, W, "n pos head d_model, head d_model d_head -> n pos head d_head")
    else:
        y = einops.einsum(x, W, "n pos d_model, head d_model d_head -> n pos head d_head")
    y = y + is_bias.view(-1, 1, 1, 1).to(y.dtype) * b
    return _finish(qk, y, which, is_bias, norm_scale, attention_mask)


def project_constant(
    qk: QKWeights,
    constant: Float[Tensor, " d_model"] | None,
    which: Literal["q", "k"],
    shape: tuple[int, int],
    norm_scale: Tensor | None,
    attention_mask: Int[Tensor, "n pos"] | None,
) -> Float[Tensor, "n pos head d_head"]:
    """:func:`project` of an input equal to ``constant`` at every position (``None``: zero),
    biases included, with one row's matrix product instead of one per position."""
    W, b = (qk.W_Q, qk.b_Q) if which == "q" else (qk.W_K, qk.b_K)
    y = b if constant is None else einops.einsum(constant, W, "d, head d e -> head e") + b
    y = y.expand(*shape, *y.shape)
    ones = y.new_ones(shape[0])
    return _finish(qk, y, which, ones, norm_scale, attention_mask)


def _finish(
    qk: QKWeights,
    y: Tensor,
    which: Literal["q", "k"],
    is_bias: Tensor,
    norm_scale: Tensor | None,
    attention_mask: Int[Tensor, "n pos"] | None,
) -> Tensor:
    """A projection's frozen QK norm, rotary, log-n scaling and grouped-key repeat."""
    norm = qk.q_norm if which == "q" else qk.k_norm
    y = _frozen_qk_norm(y, norm, qk.norm_style, norm_scale, is_bias.to(y.dtype))
    if qk.rotary is not None:  # the backend's own rotary and log-n code (see QKWeights)
        y = qk.rotary(y, attention_mask)
    if which == "q" and qk.logn is not None:
        y = qk.logn(y)
    if which == "k" and qk.kv_repeat > 1:
        y = torch.repeat_interleave(y, qk.kv_repeat, dim=2)
    return y


def attention_input(
    adapter: ModelAdapter,
    layer: int,
    normalized: Float[Tensor, "batch comp pos *head d_model"],
    is_bias: Float[Tensor, "1 comp 1 1"],
    pos_embed: Float[Tensor, "batch pos d_model"] | None,
) -> Float[Tensor, "batch comp pos *head d_model"]:
    """What queries and keys read, per component: the norm's weight and bias applied to the
    normalised stream (bias to ``bias``), plus shortformer positions (also to ``bias``).

    ``normalized`` may carry a head axis before ``d_model`` (split per-head inputs)."""
    norm = adapter.attention_input_norm(layer)
    x = normalized
    per_head = normalized.ndim == 5
    if per_head:
        is_bias = is_bias.unsqueeze(-1)
    if norm is not None and norm.w is not None:
        x = x * norm.w
    if norm is not None and norm.b is not None:
        x = x + is_bias * norm.b
    if pos_embed is not None:
        pos = pos_embed[:, None, :, None, :] if per_head else pos_embed.unsqueeze(1)
        x = x + is_bias * pos
    return x


@dataclass
class LayerQK:
    """The real QK quantities of one layer, computed once per run and shared by all chunks."""

    weights: QKWeights
    q: Float[Tensor, "batch pos head d_head"]
    k: Float[Tensor, "batch pos head d_head"]
    scores: Float[Tensor, "batch head query key"]  # hook_attn_scores: capped, ALiBi, masked
    ratio: Float[Tensor, "batch head query key"]  # soft cap / raw (1 without a cap)
    extra: Float[Tensor, "batch head query key"]  # scores - ratio * raw: ALiBi etc., to bias
    allowed: Bool[Tensor, "batch head query key"]
    q_scale: Tensor | None
    k_scale: Tensor | None
    attention_mask: Int[Tensor, "batch pos"] | None
    pos_embed: Float[Tensor, "batch pos d_model"] | None

    def scales_for(self, n_comp: int) -> tuple[Tensor | None, Tensor | None]:
        """The frozen QK-norm scales repeated for ``n_comp`` components per prompt."""
        return _repeat(self.q_scale, n_comp), _repeat(self.k_scale, n_comp)

    def mask_for(self, n_comp: int) -> Int[Tensor, "n pos"] | None:
        return _repeat(self.attention_mask, n_comp)


def _repeat(x: Tensor | None, n: int) -> Tensor | None:
    if x is None:
        return None
    return einops.repeat(x, "batch ... -> (batch comp) ...", comp=n)


def norm_scale_of(value: Tensor | None, batch: int, n_pos: int, style: str) -> Tensor | None:
    """TransformerLens flattens per-head QK-norm scales to ``[batch*pos*head, 1]``."""
    if value is None:
        return None
    if style == "head":
        return value.reshape(batch, n_pos, -1, 1)
    return value.reshape(batch, n_pos, 1)


def layer_qk(
    adapter: ModelAdapter,
    layer: int,
    activations: Activations,
    attention_mask: Int[Tensor, "batch pos"] | None,
) -> LayerQK:
    """Real queries, keys and scores of ``layer`` from the real activations (a cache or dict).

    A half-precision model's are recomputed in float32 from its (half-precision) input; the
    difference from its own scores joins ``extra`` (to ``bias``), so shares still sum to them."""
    qk = adapter.qk(layer)
    prefix = f"blocks.{layer}.attn"
    normalized = activations[adapter.attention_input_hook(layer)]
    normalized = normalized.to(compute_dtype(normalized.dtype))
    batch, n_pos, _ = normalized.shape
    pos_embed = activations["hook_pos_embed"] if adapter.positional == "shortformer" else None
    one = normalized.new_ones(1, 1, 1, 1)
    x = attention_input(adapter, layer, normalized.unsqueeze(1), one, pos_embed)[:, 0]
    q_scale = k_scale = None
    if qk.norm_style != "none":
        q_scale = norm_scale_of(
            activations[f"{prefix}.q_norm.hook_scale"], batch, n_pos, qk.norm_style
        )
        k_scale = norm_scale_of(
            activations[f"{prefix}.k_norm.hook_scale"], batch, n_pos, qk.norm_style
        )
    ones = normalized.new_ones(batch)
    q = project(qk, x, "q", ones, q_scale, attention_mask)
    k = project(qk, x, "k", ones, k_scale, attention_mask)
    raw = einops.einsum(q, k, "b i h e, b j h e -> b h i j") / qk.attn_scale
    hooked = activations[f"{prefix}.hook_attn_scores"]
    scores = hooked.to(raw.dtype)
    cap = adapter.attn_scores_soft_cap
    if cap > 0:
        safe = torch.where(raw == 0, torch.ones_like(raw), raw)
        ratio = torch.where(raw == 0, torch.ones_like(raw), cap * torch.tanh(raw / cap) / safe)
    else:
        ratio = torch.ones_like(raw)
    allowed = unmasked(hooked)  # -inf or an additive finfo.min mask (Hugging Face)
    extra = torch.where(allowed, scores - ratio * raw, torch.zeros_like(raw))
    return LayerQK(
        qk, q, k, scores, ratio, extra, allowed, q_scale, k_scale, attention_mask, pos_embed
    )


def score_shares(
    real: LayerQK,
    x: Float[Tensor, "batch comp pos *head d_model"],
    is_bias: Float[Tensor, "1 comp 1 1"],
    side: ScoreSide = "symmetric",
    x_key: Float[Tensor, "batch comp pos *head d_model"] | None = None,
) -> Float[Tensor, "batch comp head query key"]:
    """Each component's share of every (capped, biased) score; zero where the score is masked.

    ``x`` is the attention input per component (see :func:`attention_input`); ``x_key``, if given,
    is what the keys read instead (split per-head query and key inputs). Summed over components
    the shares give ``hook_attn_scores`` at every unmasked entry.
    """
    batch, n_comp, n_pos = x.shape[:3]
    flat = einops.rearrange(x, "b c p ... -> (b c) p ...")
    flat_key = flat if x_key is None else einops.rearrange(x_key, "b c p ... -> (b c) p ...")
    bias_rows = einops.repeat(is_bias.view(-1), "c -> (b c)", b=batch)
    q_scale, k_scale = real.scales_for(n_comp)
    mask = real.mask_for(n_comp)
    w_query, w_key = SIDE_WEIGHTS[side]
    raw = x.new_zeros(batch, n_comp, real.scores.shape[1], n_pos, n_pos)
    if w_query:
        q_c = project(real.weights, flat, "q", bias_rows, q_scale, mask)
        q_c = einops.rearrange(q_c, "(b c) i h e -> b c i h e", b=batch)
        raw = raw + w_query * einops.einsum(q_c, real.k, "b c i h e, b j h e -> b c h i j")
    if w_key:
        k_c = project(real.weights, flat_key, "k", bias_rows, k_scale, mask)
        k_c = einops.rearrange(k_c, "(b c) j h e -> b c j h e", b=batch)
        raw = raw + w_key * einops.einsum(real.q, k_c, "b i h e, b c j h e -> b c h i j")
    shares = real.ratio.unsqueeze(1) * raw / real.weights.attn_scale
    shares = shares + is_bias.unsqueeze(-1) * real.extra.unsqueeze(1)
    return torch.where(real.allowed.unsqueeze(1), shares, torch.zeros_like(shares))


def check_positions(query: Tensor, key: Tensor, allowed: Tensor, head: int) -> None:
    """Refuse scores that the model masks (a key after the query, padding, outside a window)."""
    rows = torch.arange(len(query), device=query.device)
    ok = allowed[rows, head, query, key]
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise DePassInputError(
            f"AttentionScore: the score from position {int(query[bad])} to {int(key[bad])} of "
            f"prompt {bad} is masked (a later key, padding or outside the attention window)"
        )


# ---------------------------------------------------------------------------- the split rule
AttentionSide = Literal["value", "pattern", "symmetric"]


@dataclass(frozen=True)
class AttentionSplit:
    """How a head's output ``z = A v`` is split among components (the attention analogue of a
    gated MLP's split: the pattern ``A`` is the gate, the values ``v`` the up-projection).

    - ``"value"`` (DePass as published, the default): ``z_c = A v_c``. The pattern is frozen, so a
      component is credited only for what it writes through the values (OV circuit).
    - ``"pattern"``: ``z_c = U v_c + dA_c v``. ``U`` is the uniform pattern (all scores equal) and
      ``dA_c = M(s_c)`` is component ``c``'s share of ``A - U``: the integrated softmax Jacobian
      applied to its symmetric score share ``s_c``. A component is credited for *moving the
      pattern* (QK circuit), e.g. a previous-token head for the induction head it steers.
    - ``"symmetric"``: the average of the two.

    Every side is lossless and linear in the components (adjoint mode works with each).
    ``nodes``: quadrature nodes for ``M`` on every row (default: chosen per row from its score
    spread and key count, see :mod:`depass_lens.integrated_softmax`; the remainder, which goes to
    ``bias``, stays below 1e-6 of ``|A - U|``). With a contrastive circuit graph's difference
    linearisation, the same count is used on the path between the two runs' scores.
    """

    side: AttentionSide = "value"
    nodes: int | None = None

    def __post_init__(self) -> None:
        if self.side not in ("value", "pattern", "symmetric"):
            raise DePassInputError(
                f"attention side must be 'value', 'pattern' or 'symmetric', not {self.side!r}"
            )

    @property
    def uses_pattern(self) -> bool:
        return self.side != "value"

    @property
    def pattern_weight(self) -> float:
        """How much of ``dA_c v`` component ``c`` receives."""
        return {"value": 0.0, "pattern": 1.0, "symmetric": 0.5}[self.side]

    def value_pattern(
        self, pattern: Float[Tensor, "b h q k"], uniform: Float[Tensor, "b h q k"]
    ) -> Float[Tensor, "b h q k"]:
        """The pattern that mixes each component's own values."""
        if self.side == "value":
            return pattern
        if self.side == "pattern":
            return uniform
        return 0.5 * (pattern + uniform)


def get_attention_split(split: str | AttentionSplit | None) -> AttentionSplit:
    """Resolve ``"value"``, ``"pattern"``, ``"symmetric"`` or an :class:`AttentionSplit`."""
    if split is None:
        return AttentionSplit()
    if isinstance(split, AttentionSplit):
        return split
    return AttentionSplit(split)  # type: ignore[arg-type]
