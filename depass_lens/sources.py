"""Where attribution starts: initial decompositions of a hidden state.

Token, head, neuron, module and subspace attribution are the *same* propagation started from
different splits. A source turns the real activations of one forward pass into one or more
:class:`Decomposition` objects (one per start point: ``Heads`` over 12 layers starts 12 times),
and, for adjoint mode, contracts the gradient at its start hooks with its components.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter, NormWeights
from depass_lens.checks import as_int, check_unique
from depass_lens.decomposition import BIAS, ComponentLabel, Decomposition, check_lossless
from depass_lens.errors import DePassInputError
from depass_lens.norms import (
    post_norm_scale_hooks,
    post_sublayer_norms,
    pull_back,
    through_norms,
)


@dataclass
class SourceContext:
    """What a source reads: the adapter, real activations (a cache or dict) and the input."""

    adapter: ModelAdapter
    cache: object  # ActivationCache or Mapping[str, Tensor]; indexed by hook name
    tokens: Int[Tensor, "batch pos"]
    str_tokens: list[list[str]] | None = None

    def __getitem__(self, name: str) -> Tensor:
        return self.cache[name]  # type: ignore[index]


def _check_layer(layer: int, adapter: ModelAdapter, what: str) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise DePassInputError(f"{what}: layer must be an int, got {layer!r}")
    n = adapter.n_layers
    if not -n <= layer < n:
        raise DePassInputError(
            f"{what}: layer {layer} is out of range for a model with {n} layers (0..{n - 1})"
        )
    return layer % n


def _with_bias(
    parts: Float[Tensor, "batch comp pos d"], bias: Float[Tensor, "batch pos d"] | None = None
) -> Float[Tensor, "batch comp pos d"]:
    if bias is None:
        bias = torch.zeros_like(parts[:, 0])
    return torch.cat([parts, bias.unsqueeze(1)], dim=1)


class Source(ABC):
    """Base class: builds initial decompositions and contracts adjoint gradients with them."""

    @abstractmethod
    def start_hooks(self, adapter: ModelAdapter) -> list[str]:
        """The hook(s) where the decomposition(s) live, one per start point."""

    @abstractmethod
    def needed_hooks(self, adapter: ModelAdapter) -> list[str]:
        """Cache entries the source reads to build its components."""

    @abstractmethod
    def decompositions(self, ctx: SourceContext) -> list[Decomposition]:
        """The initial decompositions, in the order of :meth:`start_hooks`."""

    def gradient_hooks(self, adapter: ModelAdapter) -> list[str]:
        """Where adjoint mode needs the gradient (``hook_embed`` is read at resid_pre 0)."""
        return [
            "blocks.0.hook_resid_pre" if hook == "hook_embed" else hook
            for hook in self.start_hooks(adapter)
        ]

    def scores(
        self, ctx: SourceContext, grads: dict[str, Tensor]
    ) -> list[Float[Tensor, "batch comp"]]:
        """Adjoint scores ``<grad, component>`` per decomposition (the bias entry left at 0)."""
        out = []
        hooks = self.gradient_hooks(ctx.adapter)
        for decomposition, hook in zip(self.decompositions(ctx), hooks):
            comps = decomposition.components
            if decomposition.pos_components is not None and ctx.adapter.positional == "standard":
                comps = comps + decomposition.pos_components
            out.append(einops.einsum(comps, grads[hook], "b c p d, b p d -> b c"))
        return out

    def count(self, adapter: ModelAdapter, n_pos: int) -> int:
        """Number of components (over all start points), used by ``mode="auto"``."""
        return n_pos

    def label_groups(self, ctx: SourceContext) -> list[list[ComponentLabel]]:
        """Component labels per start point (sources override this to avoid building tensors)."""
        return [d.labels for d in self.decompositions(ctx)]


# ---------------------------------------------------------------------------------- tokens
class Tokens(Source):
    """One component per input position: the token's embedding (layer 0) or its state at a layer.

    Args:
        layer: 0 decomposes the embedding; ``L > 0`` decomposes ``blocks.L.hook_resid_pre`` by
            position (token -> output attribution from layer L on).
        pos_embed: ``"with_token"`` keeps each position's positional embedding with its token;
            ``"separate"`` makes all positional embeddings one extra ``pos_embed`` component.
    """

    def __init__(self, layer: int = 0, pos_embed: Literal["with_token", "separate"] = "with_token"):
        if pos_embed not in ("with_token", "separate"):
            raise DePassInputError(
                f"pos_embed must be 'with_token' or 'separate', not {pos_embed!r}"
            )
        self.layer = layer
        self.pos_embed = pos_embed

    def __repr__(self) -> str:
        return f"Tokens(layer={self.layer}, pos_embed={self.pos_embed!r})"

    def _layer(self, adapter: ModelAdapter) -> int:
        return _check_layer(self.layer, adapter, "Tokens")

    def start_hooks(self, adapter):
        layer = self._layer(adapter)
        return ["hook_embed"] if layer == 0 else [f"blocks.{layer}.hook_resid_pre"]

    def needed_hooks(self, adapter):
        layer = self._layer(adapter)
        if layer == 0:
            return (
                ["hook_embed", "hook_pos_embed"]
                if adapter.positional
                in (
                    "standard",
                    "shortformer",
                )
                else ["hook_embed"]
            )
        return [f"blocks.{layer}.hook_resid_pre"]

    def _separate(self, adapter: ModelAdapter) -> bool:
        return (
            self._layer(adapter) == 0
            and self.pos_embed == "separate"
            and (adapter.positional == "standard")
        )

    def label_groups(self, ctx):
        return [self._labels(ctx, ctx.tokens.shape[1])]

    def _labels(self, ctx: SourceContext, n_pos: int) -> list[ComponentLabel]:
        texts = ctx.str_tokens[0] if ctx.str_tokens and len(ctx.str_tokens) == 1 else None
        labels = [
            ComponentLabel(
                "token", self._layer(ctx.adapter), pos=p, text=texts[p] if texts else None
            )
            for p in range(n_pos)
        ]
        if self._separate(ctx.adapter):
            labels.append(ComponentLabel("pos_embed"))
        return labels + [BIAS]

    def decompositions(self, ctx):
        adapter = ctx.adapter
        hook = self.start_hooks(adapter)[0]
        state = ctx["hook_embed"] if hook == "hook_embed" else ctx[hook]
        batch, n_pos, _ = state.shape
        diagonal = torch.arange(n_pos, device=state.device)
        extra = 1 if self._separate(adapter) else 0
        shape = (batch, n_pos + extra + 1, n_pos, state.shape[-1])
        comps = state.new_zeros(shape)
        comps[:, diagonal, diagonal] = state  # token t lives at position t only
        pos_comps = None
        if hook == "hook_embed" and adapter.positional in ("standard", "shortformer"):
            pos = ctx["hook_pos_embed"]
            pos_comps = state.new_zeros(shape)
            if extra:
                pos_comps[:, n_pos] = pos
            else:
                pos_comps[:, diagonal, diagonal] = pos
        return [Decomposition(hook, comps, self._labels(ctx, n_pos), pos_components=pos_comps)]

    def scores(self, ctx, grads):
        adapter = ctx.adapter
        hook = self.start_hooks(adapter)[0]
        grad = grads[self.gradient_hooks(adapter)[0]]
        state = ctx["hook_embed"] if hook == "hook_embed" else ctx[hook]
        token_scores = (grad * state).sum(-1)
        parts = [token_scores]
        if hook == "hook_embed" and adapter.positional == "standard":
            pos_scores = (grad * ctx["hook_pos_embed"]).sum(-1)
            if self._separate(adapter):
                parts.append(pos_scores.sum(-1, keepdim=True))
            else:
                parts[0] = token_scores + pos_scores
        parts.append(torch.zeros_like(token_scores[:, :1]))
        return [torch.cat(parts, dim=-1)]

    def count(self, adapter, n_pos):
        return n_pos


# ---------------------------------------------------------------------------------- heads
def _index_list(values: int | Sequence[int] | None, what: str) -> int | list[int] | None:
    """A user's layer/head/neuron selection: ``None`` (all), one int, or distinct ints.

    Checked when the source is built: non-ints, an empty list and repeats (which would count a
    component twice) are refused. Ranges need the model and are checked on use.
    """
    if values is None:
        return None
    if isinstance(values, str):
        raise DePassInputError(f"{what} must be ints, got {values!r}")
    if not isinstance(values, Iterable) or getattr(values, "ndim", 1) == 0:
        return as_int(values, what)
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    out = check_unique(items, what)
    if not out:
        raise DePassInputError(f"{what}: an empty list selects nothing; pass None for all")
    return out


def _layers(layers: int | Sequence[int] | None, adapter: ModelAdapter, what: str) -> list[int]:
    if layers is None:
        return list(range(adapter.n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = [_check_layer(layer, adapter, what) for layer in layers]
    return check_unique(out, f"{what}: layers")


class Heads(Source):
    """Each attention head's output at its layer (plus ``rest`` = the stream before it, ``bias``).

    One start point per layer, at the hook right after the attention output is added
    (``hook_resid_mid``, or ``hook_resid_post`` for parallel/attention-only blocks). Post-attention
    norms (``ln1_post``, OLMo post-norm) are applied to each head with their frozen scale.
    """

    def __init__(
        self, layers: int | Sequence[int] | None = None, heads: Sequence[int] | None = None
    ):
        self.layers = _index_list(layers, "Heads: layers")
        chosen = _index_list(heads, "Heads: heads")
        self.heads = [chosen] if isinstance(chosen, int) else chosen

    def __repr__(self) -> str:
        return f"Heads(layers={self.layers}, heads={self.heads})"

    def _heads(self, adapter: ModelAdapter) -> list[int]:
        heads = self.heads if self.heads is not None else list(range(adapter.n_heads))
        for h in heads:
            if not 0 <= h < adapter.n_heads:
                raise DePassInputError(
                    f"Heads: head {h} out of range (the model has {adapter.n_heads} heads)"
                )
        return heads

    def start_hooks(self, adapter):
        return [adapter.after_attention_hook(L) for L in _layers(self.layers, adapter, "Heads")]

    def needed_hooks(self, adapter):
        names = []
        for layer in _layers(self.layers, adapter, "Heads"):
            names += [adapter.after_attention_hook(layer), f"blocks.{layer}.attn.hook_z"]
            names += post_norm_scale_hooks(adapter, layer, "attn")
        return names

    def head_outputs(
        self, ctx: SourceContext, layer: int
    ) -> tuple[Float[Tensor, "batch head pos d_model"], Float[Tensor, "batch pos d_model"]]:
        """What each selected head adds to the stream, and the constant the layer adds."""
        adapter = ctx.adapter
        weights = adapter.attention(layer)
        z = ctx[f"blocks.{layer}.attn.hook_z"][:, :, self._heads(adapter)]
        per_head = einops.einsum(z, weights.W_O[self._heads(adapter)], "b p h e, h e d -> b h p d")
        bias = weights.b_O.expand(z.shape[0], z.shape[1], -1)
        return through_norms(ctx, post_sublayer_norms(adapter, layer, "attn"), per_head, bias)

    def label_groups(self, ctx):
        return [
            [ComponentLabel("head", layer, h) for h in self._heads(ctx.adapter)]
            + [ComponentLabel("rest", layer), BIAS]
            for layer in _layers(self.layers, ctx.adapter, "Heads")
        ]

    def decompositions(self, ctx):
        adapter = ctx.adapter
        out = []
        layers = _layers(self.layers, adapter, "Heads")
        for layer, hook, labels in zip(layers, self.start_hooks(adapter), self.label_groups(ctx)):
            per_head, bias = self.head_outputs(ctx, layer)
            rest = ctx[hook] - per_head.sum(1) - bias
            comps = torch.cat([per_head, rest.unsqueeze(1), bias.unsqueeze(1)], dim=1)
            out.append(Decomposition(hook, comps, labels))
        return out

    def count(self, adapter, n_pos):
        return len(_layers(self.layers, adapter, "Heads")) * (len(self._heads(adapter)) + 2)


# ---------------------------------------------------------------------------------- neurons
class Neurons(Source):
    """Each MLP neuron's output ``post_n * W_out[n]`` at a layer (+ ``rest``, ``bias``=b_out).

    ``rest`` is the stream before the MLP plus the neurons not selected, so the components sum to
    ``blocks.L.hook_resid_post`` (the reference's neuron start sums to the state *before* the MLP;
    that is a bug we do not reproduce).
    """

    def __init__(
        self, layer: int | Sequence[int] | None = None, neurons: Sequence[int] | None = None
    ):
        self.layer = _index_list(layer, "Neurons: layers")
        chosen = _index_list(neurons, "Neurons: neurons")
        self.neurons = [chosen] if isinstance(chosen, int) else chosen

    def __repr__(self) -> str:
        return f"Neurons(layer={self.layer}, neurons={self.neurons})"

    def _layers(self, adapter: ModelAdapter) -> list[int]:
        if adapter.attn_only:
            raise DePassInputError("Neurons: this model is attention-only; it has no MLP neurons")
        if adapter.is_moe:
            raise DePassInputError(
                "Neurons: mixture-of-experts layers have per-expert neurons, which this source "
                "does not split; use Modules (the whole MLP) or Custom"
            )
        return _layers(self.layer, adapter, "Neurons")

    def _neurons(self, adapter: ModelAdapter) -> list[int]:
        neurons = self.neurons if self.neurons is not None else list(range(adapter.d_mlp))
        bad = [n for n in neurons if not 0 <= n < adapter.d_mlp]
        if bad:
            raise DePassInputError(
                f"Neurons: neuron(s) {bad[:5]} out of range (d_mlp={adapter.d_mlp})"
            )
        return neurons

    def start_hooks(self, adapter):
        return [f"blocks.{layer}.hook_resid_post" for layer in self._layers(adapter)]

    def needed_hooks(self, adapter):
        names = []
        for layer in self._layers(adapter):
            names += [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post"]
            names += post_norm_scale_hooks(adapter, layer, "mlp")
        return names

    def _norms(self, ctx: SourceContext, layer: int) -> list[NormWeights]:
        return post_sublayer_norms(ctx.adapter, layer, "mlp")

    def label_groups(self, ctx):
        return [
            [ComponentLabel("neuron", layer, n) for n in self._neurons(ctx.adapter)]
            + [ComponentLabel("rest", layer), BIAS]
            for layer in self._layers(ctx.adapter)
        ]

    def decompositions(self, ctx):
        out = []
        neurons = self._neurons(ctx.adapter)
        groups = self.label_groups(ctx)
        for layer, hook, labels in zip(
            self._layers(ctx.adapter), self.start_hooks(ctx.adapter), groups
        ):
            mlp = ctx.adapter.mlp(layer)
            post = ctx[f"blocks.{layer}.mlp.hook_post"][..., neurons]
            per_neuron = einops.einsum(post, mlp.W_out[neurons], "b p n, n d -> b n p d")
            bias = mlp.b_out.expand(post.shape[0], post.shape[1], -1)
            per_neuron, bias = through_norms(ctx, self._norms(ctx, layer), per_neuron, bias)
            rest = ctx[hook] - per_neuron.sum(1) - bias
            comps = torch.cat([per_neuron, rest.unsqueeze(1), bias.unsqueeze(1)], dim=1)
            out.append(Decomposition(hook, comps, labels))
        return out

    def scores(self, ctx, grads):
        """``post_n * <N^T grad, W_out[n]>`` without materialising every neuron's output.

        ``N^T`` pulls the gradient back through the post-MLP norms; the bias component (``b_out``
        and the norms' biases) gets its own ``<bias, grad>``.
        """
        out = []
        neurons = self._neurons(ctx.adapter)
        for layer, hook in zip(self._layers(ctx.adapter), self.start_hooks(ctx.adapter)):
            mlp = ctx.adapter.mlp(layer)
            grad = grads[hook]
            post = ctx[f"blocks.{layer}.mlp.hook_post"]
            norms = self._norms(ctx, layer)
            pulled = pull_back(ctx, norms, grad)
            per_pos = einops.einsum(pulled, mlp.W_out[neurons], "b p d, n d -> b p n")
            neuron_scores = (per_pos * post[..., neurons]).sum(1)
            bias = mlp.b_out.expand(post.shape[0], post.shape[1], -1)
            selected_out = einops.einsum(
                post[..., neurons], mlp.W_out[neurons], "b p n, n d -> b p d"
            ).unsqueeze(1)
            selected_out, bias = through_norms(ctx, norms, selected_out, bias)
            rest = ctx[hook] - selected_out[:, 0] - bias
            rest_score = (grad * rest).sum((-1, -2))
            bias_score = (grad * bias).sum((-1, -2))
            out.append(torch.cat([neuron_scores, rest_score[:, None], bias_score[:, None]], -1))
        return out

    def count(self, adapter, n_pos):
        return len(self._layers(adapter)) * (len(self._neurons(adapter)) + 2)


# ---------------------------------------------------------------------------------- modules
class Modules(Source):
    """A layer's attention and MLP outputs as components (+ ``rest``, ``bias``).

    Args:
        layer: the layer(s).
        module: ``"both"`` starts after the MLP with the attention and the MLP output;
            ``"attn"`` starts right after the attention (``hook_resid_mid``, or ``hook_resid_post``
            for parallel blocks) with its output alone, so the MLP of the same layer splits it
            from the rest; ``"mlp"`` starts after the MLP with its output alone. The last two are
            the reference implementation's module-level starts.
    """

    def __init__(
        self,
        layer: int | Sequence[int] | None = None,
        module: Literal["both", "attn", "mlp"] = "both",
    ):
        if module not in ("both", "attn", "mlp"):
            raise DePassInputError(
                f"Modules: module must be 'both', 'attn' or 'mlp', not {module!r}"
            )
        self.layer = _index_list(layer, "Modules: layers")
        self.module = module

    def __repr__(self) -> str:
        return f"Modules(layer={self.layer}, module={self.module!r})"

    def _kinds(self, adapter: ModelAdapter) -> list[str]:
        if self.module == "mlp" and adapter.attn_only:
            raise DePassInputError("Modules: this model is attention-only; it has no MLP output")
        kinds = ["attn", "mlp"] if self.module == "both" else [self.module]
        return [k for k in kinds if not (k == "mlp" and adapter.attn_only)]

    def start_hooks(self, adapter):
        layers = _layers(self.layer, adapter, "Modules")
        if self.module == "attn":
            return [adapter.after_attention_hook(layer) for layer in layers]
        return [f"blocks.{layer}.hook_resid_post" for layer in layers]

    def needed_hooks(self, adapter):
        names = []
        layers = _layers(self.layer, adapter, "Modules")
        for layer, hook in zip(layers, self.start_hooks(adapter)):
            names += [hook] + [f"blocks.{layer}.hook_{k}_out" for k in self._kinds(adapter)]
        return names

    def decompositions(self, ctx):
        out = []
        adapter = ctx.adapter
        kinds = self._kinds(adapter)
        layers = _layers(self.layer, adapter, "Modules")
        for layer, hook in zip(layers, self.start_hooks(adapter)):
            stacked = torch.stack([ctx[f"blocks.{layer}.hook_{k}_out"] for k in kinds], dim=1)
            rest = ctx[hook] - stacked.sum(1)
            comps = _with_bias(torch.cat([stacked, rest.unsqueeze(1)], dim=1))
            labels = [ComponentLabel(k, layer) for k in kinds]
            out.append(Decomposition(hook, comps, labels + [ComponentLabel("rest", layer), BIAS]))
        return out

    def count(self, adapter, n_pos):
        return len(_layers(self.layer, adapter, "Modules")) * (len(self._kinds(adapter)) + 2)


# ---------------------------------------------------------------------------------- subspaces
def _resid_hook(layer: int, hook: str | None, adapter: ModelAdapter, what: str) -> str:
    if hook is not None:
        return hook
    return f"blocks.{_check_layer(layer, adapter, what)}.hook_resid_pre"


def orthonormal_basis(
    basis: Float[Tensor, "k d_model"], d_model: int, what: str
) -> Float[Tensor, "k d_model"]:
    """Orthonormalise a user basis (rows), rejecting wrong widths, NaN and rank deficiency."""
    if basis.ndim == 1:
        basis = basis.unsqueeze(0)
    if basis.ndim != 2 or basis.shape[1] != d_model:
        raise DePassInputError(
            f"{what}: basis must have shape [k, d_model={d_model}], got {tuple(basis.shape)}"
        )
    if not torch.isfinite(basis).all():
        raise DePassInputError(f"{what}: basis contains NaN or inf")
    q, r = torch.linalg.qr(basis.T.to(torch.float64))
    diag = r.diagonal().abs()
    if diag.numel() == 0 or diag.min() <= 1e-8 * diag.max().clamp_min(1e-300):
        raise DePassInputError(f"{what}: basis vectors are linearly dependent (or zero)")
    return q.T.to(basis.dtype)


class Subspace(Source):
    """Projections of the stream onto user subspaces, plus their orthogonal ``rest``.

    Args:
        layer: decompose ``blocks.{layer}.hook_resid_pre`` (or ``hook`` if given).
        basis: ``[k, d_model]`` spanning one subspace, or a dict ``name -> basis`` of mutually
            orthogonal subspaces (each becomes one component). Bases are orthonormalised.
    """

    def __init__(
        self,
        layer: int = 0,
        basis: Tensor | dict[str, Tensor] | None = None,
        hook: str | None = None,
    ):
        if basis is None:
            raise DePassInputError(
                "Subspace needs a basis: a [k, d_model] tensor or a dict of them"
            )
        self.layer = layer
        self.bases = basis if isinstance(basis, dict) else {"subspace": basis}
        self.hook = hook

    def __repr__(self) -> str:
        return f"Subspace(layer={self.layer}, subspaces={list(self.bases)})"

    def start_hooks(self, adapter):
        return [_resid_hook(self.layer, self.hook, adapter, "Subspace")]

    def needed_hooks(self, adapter):
        return self.start_hooks(adapter)

    def projectors(self, adapter: ModelAdapter) -> dict[str, Tensor]:
        orth = {
            name: orthonormal_basis(b.to(adapter.device), adapter.d_model, f"Subspace {name!r}")
            for name, b in self.bases.items()
        }
        stacked = torch.cat(list(orth.values()), dim=0).to(torch.float64)
        gram = stacked @ stacked.T
        if not torch.allclose(gram, torch.eye(len(gram), dtype=gram.dtype), atol=1e-6):
            raise DePassInputError(
                "Subspace: the subspaces are not mutually orthogonal, so their projections do not "
                "add up; orthogonalise them or pass one basis"
            )
        return orth

    def decompositions(self, ctx):
        hook = self.start_hooks(ctx.adapter)[0]
        state = ctx[hook]
        parts = []
        for basis in self.projectors(ctx.adapter).values():
            basis = basis.to(state.dtype)
            parts.append(einops.einsum(state, basis, basis, "b p d, k d, k e -> b p e"))
        stacked = torch.stack(parts, dim=1)
        rest = state - stacked.sum(1)
        labels = [
            ComponentLabel("subspace", index=i, text=name) for i, name in enumerate(self.bases)
        ]
        comps = _with_bias(torch.cat([stacked, rest.unsqueeze(1)], dim=1))
        return [Decomposition(hook, comps, labels + [ComponentLabel("rest"), BIAS])]

    def count(self, adapter, n_pos):
        return len(self.bases) + 2


# ---------------------------------------------------------------------------------- custom
class Custom(Source):
    """User-given components at a residual hook; they must sum to the real state there.

    Args:
        hook: e.g. ``"blocks.2.hook_resid_pre"`` (or ``"hook_embed"`` for the embedding).
        components: ``[batch, comp, pos, d_model]`` (or ``[comp, pos, d_model]`` for batch 1).
        labels: optional names, one per component. A zero ``bias`` component is appended.
    """

    def __init__(self, hook: str, components: Tensor, labels: Sequence[str] | None = None):
        self.hook = hook
        self.components = components
        self.names = list(labels) if labels is not None else None

    def __repr__(self) -> str:
        return f"Custom(hook={self.hook!r}, n={self.components.shape[-3]})"

    def start_hooks(self, adapter):
        return [self.hook]

    def needed_hooks(self, adapter):
        return [self.hook] + (["hook_pos_embed"] if self.hook == "hook_embed" else [])

    def decompositions(self, ctx):
        comps = self.components
        if comps.ndim == 3:
            comps = comps.unsqueeze(0)
        state = ctx[self.hook]
        if (
            comps.ndim != 4
            or comps.shape[0] != state.shape[0]
            or comps.shape[2:] != state.shape[1:]
        ):
            raise DePassInputError(
                f"Custom: components must have shape [batch={state.shape[0]}, comp, "
                f"pos={state.shape[1]}, d_model={state.shape[2]}], got "
                f"{tuple(self.components.shape)}"
            )
        comps = comps.to(device=state.device, dtype=state.dtype)
        check_lossless(comps, state, f"Custom({self.hook!r})", slack=10.0, error=DePassInputError)
        names = self.names or [f"custom{i}" for i in range(comps.shape[1])]
        if len(names) != comps.shape[1]:
            raise DePassInputError(f"Custom: {len(names)} labels for {comps.shape[1]} components")
        labels = [ComponentLabel("custom", index=i, text=n) for i, n in enumerate(names)]
        pos = None
        if self.hook == "hook_embed" and "hook_pos_embed" in _keys(ctx.cache):
            pos = torch.zeros_like(_with_bias(comps))
            pos[:, -1] = ctx["hook_pos_embed"]  # positions are not split: they join the bias
        return [Decomposition(self.hook, _with_bias(comps), labels + [BIAS], pos_components=pos)]

    def count(self, adapter, n_pos):
        return self.components.shape[-3] + 1


def _keys(cache: object) -> set[str]:
    inner = getattr(cache, "cache_dict", cache)
    return set(inner.keys())  # type: ignore[attr-defined]


class Combined(Source):
    """Several sources at once: their start points are concatenated.

    In adjoint mode every start point shares the one backward pass, so tokens, heads and neurons
    are all scored by a single forward and a single backward per target.
    """

    def __init__(self, sources: Sequence[Source]):
        if isinstance(sources, str) or not isinstance(sources, Sequence):
            raise DePassInputError(f"Combined needs a list of sources, got {sources!r}")
        if not sources:
            raise DePassInputError("Combined needs a non-empty list of sources")
        bad = [s for s in sources if not isinstance(s, Source)]
        if bad:
            raise DePassInputError(f"Combined: {bad[0]!r} is not a source; {_SOURCE_HINT}")
        self.sources = list(sources)

    def __repr__(self) -> str:
        return f"Combined({self.sources!r})"

    def start_hooks(self, adapter):
        return [hook for s in self.sources for hook in s.start_hooks(adapter)]

    def gradient_hooks(self, adapter):
        return [hook for s in self.sources for hook in s.gradient_hooks(adapter)]

    def needed_hooks(self, adapter):
        return [hook for s in self.sources for hook in s.needed_hooks(adapter)]

    def decompositions(self, ctx):
        return [d for s in self.sources for d in s.decompositions(ctx)]

    def scores(self, ctx, grads):
        return [part for s in self.sources for part in s.scores(ctx, grads)]

    def count(self, adapter, n_pos):
        return sum(s.count(adapter, n_pos) for s in self.sources)

    def label_groups(self, ctx):
        return [group for s in self.sources for group in s.label_groups(ctx)]


_SOURCE_HINT = (
    "pass a Source object: dp.Tokens(), dp.Heads(), dp.Neurons(layer), dp.Modules(), "
    "dp.Subspace(layer, basis), dp.Custom(hook, components), dp.SAELatents(sae), or a list of them"
)


def as_source(source: Source | Sequence[Source] | None) -> Source:
    """Accept one source, a list of sources (combined), or ``None`` (tokens)."""
    if source is None:
        return Tokens()
    if isinstance(source, Source):
        return source
    if isinstance(source, str) or not isinstance(source, Sequence):
        raise DePassInputError(f"source={source!r} is not a source; {_SOURCE_HINT}")
    return Combined(list(source))


__all__ = [
    "Source",
    "SourceContext",
    "Tokens",
    "Heads",
    "Neurons",
    "Modules",
    "Subspace",
    "Custom",
    "Combined",
    "as_source",
]
