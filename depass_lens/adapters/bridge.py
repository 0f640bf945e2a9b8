"""The TransformerLens 4.x adapter: reads a ``TransformerBridge`` in compatibility mode.

Compatibility mode is what gives a bridge TransformerLens's hook names (``blocks.L.hook_resid_pre``,
``blocks.L.attn.hook_pattern``, ``blocks.L.mlp.hook_post``, ...) and stacked weight views
(``attn.W_Q`` ``[head d_model d_head]``, ``mlp.W_in`` ``[d_model d_mlp]``). A bridge that is not
in it yet is switched on with ``no_processing=True``: hooks and views are added, the weights and
the function the model computes stay as they were. (Call ``enable_compatibility_mode()`` yourself
first for TransformerLens 3's folded/centred weights.)

What differs from a ``HookedTransformer`` and is handled here: norms are bridge components over
the wrapped module (Gemma stores RMSNorm weights as an offset from 1), biases may be absent
(read as zeros), the activation function and attention scale live on the wrapped module, and
rotary embeddings are the wrapped model's own (HF ``rotary_emb`` or the native ``rotary``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapters.base import (
    POST_NORM_ARCHITECTURES,
    AttentionWeights,
    MLPWeights,
    ModelAdapter,
    NormKind,
    NormWeights,
    QKWeights,
    Rotary,
    as_tensor,
    device_spread,
    parameter_versions,
)
from depass_lens.adapters.native_scores import needs_repair
from depass_lens.adapters.split_inputs import Projection, SplitInputs
from depass_lens.errors import UnsupportedModelError

#: The start of the warnings a bridge norm gives when hooks move it off its native-autograd
#: path (see :meth:`BridgeAdapter.hooks`).
NORM_PATH_WARNING = (
    r"(Backward hooks on hook_scale/hook_normalized|A forward hook edited hook_scale)"
)
_ACT_ATTRS = ("act_fn", "act", "activation_fn")


def enable_compatibility(bridge: Any) -> None:
    """Switch ``bridge`` to compatibility mode without weight processing, or refuse saying how."""
    if getattr(bridge, "compatibility_mode", False):
        return
    try:
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    except (RuntimeError, NotImplementedError) as error:
        raise UnsupportedModelError(
            "DePass reads a TransformerBridge through TransformerLens's hook names and stacked "
            "weights, which need compatibility mode; enabling it failed "
            f"({error}). Call bridge.enable_compatibility_mode() yourself, or use a model "
            "whose adapter supports it"
        ) from error


def name_stream_hooks(bridge: Any) -> None:
    """Give each block's input and output hook point its TransformerLens name.

    In a bridge ``blocks.L.hook_resid_pre`` and ``..._post`` are aliases of the block's
    ``hook_in``/``hook_out``, and a hook function sees ``hook.name == "blocks.L.hook_in"``.
    DePass's hook functions key what they see by ``hook.name``, as on a ``HookedTransformer``;
    renaming the shared hook point changes nothing else (caches are keyed by the name asked
    for, and both names keep resolving to it)."""
    for layer in range(len(bridge.blocks)):
        for stage in ("pre", "post"):
            name = f"blocks.{layer}.hook_resid_{stage}"
            point = bridge.hook_dict.get(name)
            if point is not None:
                point.name = name


def _zeros_if_none(value: Any, shape: tuple[int, ...], like: Tensor, name: str) -> Tensor:
    """A bias, or zeros where the model has none (HF LLaMA-style projections)."""
    if value is None:
        return like.new_zeros(shape)
    return as_tensor(value, name)


class BridgeAdapter(ModelAdapter):
    """Read-only view of a TransformerLens 4.x ``TransformerBridge`` (compatibility mode)."""

    backend = "TransformerBridge"

    def __init__(self, model: Any):
        super().__init__(model)
        self._named_weights: tuple[tuple, list[tuple[str, Tensor]]] | None = None
        self._views: dict[tuple[str, int], tuple[tuple, Any]] = {}  # see _cached
        self._points: dict[str, Any] | None = None  # see hook_points
        self._split: SplitInputs | None = None  # inside split_inputs()
        enable_compatibility(model)
        name_stream_hooks(model)
        problems = unsupported_settings(model)
        if problems:
            raise UnsupportedModelError(
                "DePass cannot propagate this model exactly. Unsupported setting(s): "
                + "; ".join(problems)
            )

    # ---------------------------------------------------------------- config
    @property
    def post_norm(self) -> bool:
        return str(getattr(self.cfg, "architecture", "")) in POST_NORM_ARCHITECTURES

    @property
    def model_name(self) -> str:
        return str(getattr(self.cfg, "model_name", None) or "TransformerBridge")

    @property
    def positional(self) -> str:
        return str(self.cfg.positional_embedding_type or "standard")

    def precision(self, dtype: torch.dtype) -> torch.dtype:
        """Float32 for a float64 model whose RMS norms run the wrapped module (the bridge's
        default, ``use_native_layernorm_autograd``): HF's and the native RMSNorm compute in
        float32 whatever the input dtype, so the real activations carry float32 rounding."""
        folding = bool(getattr(self.cfg, "layer_norm_folding", False))
        upcast = any(
            getattr(module, "uses_rms_norm", False)
            and (folding or getattr(module, "use_native_layernorm_autograd", False))
            for module in self.model.modules()
            if hasattr(module, "hook_scale")
        )
        return torch.float32 if dtype == torch.float64 and upcast else dtype

    def final_query_key_hooks(self, layer: int) -> tuple[str, str] | None:
        prefix = f"blocks.{layer}.attn"
        if self.positional == "rotary":  # only this bridge class fires its post-rotary hooks
            kind = type(self.model.blocks[layer].attn).__name__
            if kind != "PositionEmbeddingsAttentionBridge":
                return None
            return (f"{prefix}.hook_rot_q", f"{prefix}.hook_rot_k")
        return (f"{prefix}.hook_q", f"{prefix}.hook_k")

    # ---------------------------------------------------------------- caches
    @property
    def hook_points(self) -> dict[str, Any]:
        """The bridge's ``hook_dict``, read once: a bridge rebuilds it, aliases included, on every
        access (about a millisecond), and its hook points do not change after compatibility
        mode is on."""
        if self._points is None:
            self._points = dict(self.model.hook_dict)
        return self._points

    def _cached(self, kind: str, layer: int, modules: list[Any], build: Callable[[], Any]) -> Any:
        """``build()``, kept until a parameter of ``modules`` changes (replaced, moved or edited
        in place) or autograd is switched on or off. A bridge builds its stacked weight views
        (``W_Q`` ``[head d_model d_head]`` ...) anew on every read; DePass reads them per forward
        pass, per hook, so reading them once keeps the adapter off the profile."""
        params = (p for module in modules if module is not None for p in module.parameters())
        key = (torch.is_grad_enabled(), *parameter_versions(params))
        hit = self._views.get((kind, layer))
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._views[(kind, layer)] = (key, value)
        return value

    # ---------------------------------------------------------------- weights
    def _norm(self, component: Any, name: str) -> NormWeights | None:
        if component is None:
            return None
        kind = _norm_kind(component)
        if kind == "none":
            return NormWeights("none", None)
        w = b = None
        if kind in ("LN", "RMS"):
            w = as_tensor(component.weight, f"{name}.weight")
            if getattr(component, "uses_weight_offset", False):
                w = 1.0 + w  # Gemma: the stored weight is an offset from 1
            if kind == "LN":
                bias = getattr(component.original_component, "bias", None)
                b = None if bias is None else as_tensor(bias, f"{name}.bias")
        return NormWeights(kind, f"{name}.hook_scale", w, b)

    def block_norms(self, layer: int) -> dict[str, NormWeights | None]:
        block = self.model.blocks[layer]
        modules = block._modules
        prefix = f"blocks.{layer}"
        names = ("ln1", "ln2", "ln1_post", "ln2_post")
        norms = [modules.get(name) for name in names]
        built = self._cached(
            "norms",
            layer,
            norms,
            lambda: {n: self._norm(m, f"{prefix}.{n}") for n, m in zip(names, norms)},
        )
        return dict(built)  # callers may edit their copy

    def final_norm(self) -> NormWeights:
        module = self.model._modules.get("ln_final")
        norm = self._cached("final_norm", -1, [module], lambda: self._norm(module, "ln_final"))
        return norm if norm is not None else NormWeights("none", None)

    def attention(self, layer: int) -> AttentionWeights:
        attn = self.model.blocks[layer].attn
        return self._cached("attention", layer, [attn], lambda: self._attention(attn))

    def _attention(self, attn: Any) -> AttentionWeights:
        W_V = as_tensor(attn.W_V, "W_V")
        W_O = as_tensor(attn.W_O, "W_O")
        return AttentionWeights(
            W_V=W_V,
            b_V=_zeros_if_none(attn.b_V, (W_V.shape[0], W_V.shape[2]), W_V, "b_V"),
            W_O=W_O,
            b_O=_zeros_if_none(attn.b_O, (W_O.shape[2],), W_O, "b_O"),
            kv_repeat=self.n_heads // int(W_V.shape[0]),
        )

    def qk_problems(self) -> list[str]:
        problems = []
        cfg = self.cfg
        if getattr(cfg, "rotary_interleaved_cos_sin", False) or getattr(
            cfg, "rotary_adjacent_pairs", False
        ):
            problems.append("adjacent-pair rotary on a TransformerBridge HF model")
        if getattr(cfg, "use_qk_norm", False) or "q_norm" in self.model.blocks[0].attn._modules:
            problems.append("QK norm on a TransformerBridge (not followed by the QK path yet)")
        if self.positional not in ("standard", "rotary"):
            problems.append(f"positional_embedding_type={self.positional!r} on a TransformerBridge")
        if needs_repair(self.model):
            problems.append(
                "TransformerLens 4's native attention fires the pattern, not the scores, at "
                "hook_attn_scores; call depass_lens.adapters.repair_native_scores(bridge) first"
            )
        if self.positional == "rotary" and self._rotary_source(0) is None:
            problems.append("rotary embedding the adapter cannot reach")
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            problems.append("scale_attn_by_inverse_layer_idx")
        return problems

    def qk(self, layer: int) -> QKWeights:
        self.check_qk_supported()
        attn = self.model.blocks[layer].attn
        return self._cached("qk", layer, [attn], lambda: self._qk(layer, attn))

    def _qk(self, layer: int, attn: Any) -> QKWeights:
        W_Q, W_K = as_tensor(attn.W_Q, "W_Q"), as_tensor(attn.W_K, "W_K")
        return QKWeights(
            W_Q=W_Q,
            b_Q=_zeros_if_none(attn.b_Q, (W_Q.shape[0], W_Q.shape[2]), W_Q, "b_Q"),
            W_K=W_K,
            b_K=_zeros_if_none(attn.b_K, (W_K.shape[0], W_K.shape[2]), W_K, "b_K"),
            kv_repeat=self.n_heads // int(W_K.shape[0]),
            q_norm=None,
            k_norm=None,
            norm_style="none",
            attn_scale=self._attn_scale(attn),
            rotary=self._rotary(layer) if self.positional == "rotary" else None,
        )

    def _attn_scale(self, attn: Any) -> float:
        """What the scores are divided by: the wrapped module's own ``scaling`` (HF) or ``scale``
        (native), else TransformerLens's rule (``cfg.attn_scale`` or ``sqrt(d_head)``)."""
        inner = attn.original_component
        scaling = getattr(inner, "scaling", None)
        if isinstance(scaling, float | int) and scaling > 0:
            return 1.0 / float(scaling)
        scale = getattr(inner, "scale", None)
        if isinstance(scale, float | int) and scale > 0:
            return float(scale)
        configured = float(getattr(self.cfg, "attn_scale", -1.0) or -1.0)
        return configured if configured > 0 else math.sqrt(int(self.cfg.d_head))

    def _rotary_source(self, layer: int) -> Any:
        native = getattr(self.model.original_model, "rotary", None)
        if native is not None and hasattr(native, "apply_rope"):
            return native
        own = getattr(self.model.blocks[layer].attn, "_rotary_emb", None)
        return own if own is not None else self.model._modules.get("rotary_emb")

    def _rotary(self, layer: int) -> Rotary:
        """The model's own rotary embedding as ``rotate(y [n pos head d_head], mask)``."""
        source = self._rotary_source(layer)
        uses_mask = self.model._accepts_derived_position_ids()

        def rotate(y: Tensor, attention_mask: Tensor | None) -> Tensor:
            positions = _position_ids(y, attention_mask if uses_mask else None)
            heads_first = y.transpose(1, 2)  # [n head pos d]
            if hasattr(source, "apply_rope"):  # the native model: adjacent pairs, own tables
                rotated, _ = source.apply_rope(heads_first, heads_first, position_ids=positions)
                return rotated.transpose(1, 2)
            cos, sin = source(heads_first, positions)  # HF: [n pos rotary_dim], halves layout
            cos, sin = cos.to(y.dtype).unsqueeze(2), sin.to(y.dtype).unsqueeze(2)
            dim = cos.shape[-1]
            turned, kept = y[..., :dim], y[..., dim:]
            half = dim // 2
            rotated = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)
            return torch.cat((turned * cos + rotated * sin, kept), dim=-1)

        return rotate

    def mlp(self, layer: int) -> MLPWeights:
        mlp = self.model.blocks[layer].mlp
        return self._cached("mlp", layer, [mlp], lambda: self._mlp(layer, mlp))

    def _mlp(self, layer: int, mlp: Any) -> MLPWeights:
        W_in, W_out = as_tensor(mlp.W_in, "W_in"), as_tensor(mlp.W_out, "W_out")
        gate = getattr(mlp, "W_gate", None)
        inner = None
        if "ln" in mlp._modules:
            inner = self._norm(mlp._modules["ln"], f"blocks.{layer}.mlp.ln")
        return MLPWeights(
            W_in=W_in,
            b_in=_zeros_if_none(mlp.b_in, (W_in.shape[1],), W_in, "b_in"),
            W_out=W_out,
            b_out=_zeros_if_none(mlp.b_out, (W_out.shape[1],), W_out, "b_out"),
            W_gate=None if gate is None else as_tensor(gate, "W_gate"),
            act_fn=_activation(mlp, layer),
            inner_norm=inner,
        )

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        b_U = getattr(self.model, "b_U", None)
        if b_U is None:
            return self.W_U.new_zeros(self.W_U.shape[1])
        return b_U

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.model.embed(tokens)

    def _backend_hook(self, handle: Any) -> bool:
        """The permanent relays TransformerLens 4 wires itself (``_wire_symbolic_hooks``: a
        placeholder component's hook point fired from its sub-components') are the bridge's."""
        fn = getattr(handle, "user_hook", None)
        return bool(getattr(handle, "is_permanent", False)) and getattr(
            fn, "__qualname__", ""
        ).startswith("_wire_symbolic_hooks.")

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """TransformerLens names (``blocks.0.mlp.W_in``), not the wrapped module's paths.

        The bridge builds these views anew on every call; they are kept until a parameter of
        the wrapped model changes, so callers that cache by tensor identity stay cached."""
        key = parameter_versions(self.model.original_model.parameters())
        if self._named_weights is None or self._named_weights[0] != key:
            self._named_weights = (key, list(self.model.tl_named_parameters()))
        return iter(self._named_weights[1])

    @contextmanager
    def split_inputs(self, per_head: bool = True) -> Iterator[None]:
        """Run the model on per-node inputs for the duration of the block, as a
        ``HookedTransformer`` does with ``use_split_qkv_input`` and ``use_hook_mlp_in``: the
        per-head inputs, the MLP's input and ``hook_resid_mid`` are the adapter's own hook points
        (:mod:`~depass_lens.adapters.split_inputs`); ``per_head=False``: the MLP's only.
        Restored afterwards, even on error."""
        kv_heads = int(self.attention(0).W_V.shape[0])
        if kv_heads != self.n_heads:
            raise UnsupportedModelError(
                f"circuit graphs need every query head's own keys and values; this "
                f"TransformerBridge groups them (grouped-query attention: n_key_value_heads="
                f"{kv_heads} < n_heads={self.n_heads}), and a bridge's attention computes one per "
                "group. Build the graph under transformer-lens 3.x, whose HookedTransformer "
                "ungroups them (every other DePass call works on this bridge)"
            )
        if getattr(self.cfg, "use_split_qkv_input", False) or getattr(
            self.cfg, "use_attn_in", False
        ):
            raise UnsupportedModelError(
                "circuit graphs run the model on split inputs themselves; turn off "
                "use_split_qkv_input / use_attn_in on the bridge first"
            )
        if getattr(self.cfg, "use_hook_mlp_in", False):
            raise UnsupportedModelError(
                "circuit graphs give the MLPs inputs of their own; turn off use_hook_mlp_in on "
                "the bridge first"
            )
        layers = range(self.n_layers)
        norms = [self.attention_input_norm(layer) for layer in layers]
        projections = [self._projections(layer) for layer in layers]
        branches = [self._mlp_branch_hook(layer) for layer in layers]
        try:
            self._splitting = True
            self._split = SplitInputs(
                self.hook_points, norms, projections, self.eps, branches, self.parallel, per_head
            )
            yield
        finally:
            self._splitting = False
            self._split = None

    def head_projections(self, layer: int) -> dict[str, Float[Tensor, "head d_model d_head"]]:
        return {side: W for side, (W, _) in self._projections(layer).items()}

    def _projections(self, layer: int) -> dict[str, Projection]:
        """``layer``'s query, key and value weights ``[head d_model d_head]`` and biases
        ``[head d_head]`` (zeros where the model has none), for the per-head inputs."""
        attn = self.model.blocks[layer].attn
        return self._cached("projections", layer, [attn], lambda: self._read_projections(attn))

    def _read_projections(self, attn: Any) -> dict[str, Projection]:
        out = {}
        for side in "qkv":
            upper = side.upper()
            W = as_tensor(getattr(attn, f"W_{upper}"), f"W_{upper}")
            b = getattr(attn, f"b_{upper}")
            out[side] = (W, _zeros_if_none(b, (W.shape[0], W.shape[2]), W, f"b_{upper}"))
        return out

    def _mlp_branch_hook(self, layer: int) -> str | None:
        """The bridge hook on what a block's MLP branch reads (``None``: no MLP): its
        ``hook_resid_mid`` (``ln2``'s input, or the MLP's where there is no ``ln2``), or for a
        parallel block, whose bridge has no ``resid_mid``, ``ln2``'s or the MLP's input."""
        if self.attn_only:
            return None
        prefix = f"blocks.{layer}"
        for name in (f"{prefix}.hook_resid_mid", f"{prefix}.ln2.hook_in", f"{prefix}.mlp.hook_in"):
            if name in self.hook_points and not (self.parallel and name.endswith("resid_mid")):
                return name
        raise UnsupportedModelError(f"{prefix} has no hook on its MLP's input to split")

    @contextmanager
    def hooks(self, fwd_hooks: list[tuple[Any, Callable]]) -> Iterator[None]:
        """``model.hooks`` with ``HookedTransformer`` semantics for the functions on one hook.

        A bridge shows some hooks a reshaped view (``hook_v`` ``[batch pos head d_head]`` of a
        flat projection), and every function on the hook gets a fresh view of the flat tensor,
        so a tensor one function keeps (for its gradient) is off the graph once a later one
        returns its own. Here the functions on one hook run as one, each on what the previous
        returned (or saw, where it returned ``None``), as on a ``HookedTransformer``, and the
        last value flows on. Inside :meth:`split_inputs`, functions on the per-head inputs go
        to the adapter's own hook points.

        A bridge norm on its native-autograd path warns that hooks on its ``hook_scale`` or
        ``hook_normalized`` move it to its Python path, "output numerics may differ". DePass's
        hooks there hold the scale at the real run's value, and its checks compare the result
        with the real activations to the dtype's tolerance, so the warning is silenced here,
        inside DePass's own runs only (:data:`NORM_PATH_WARNING`)."""
        split = self._split
        own: list[tuple[str, Callable]] = []
        if split is not None:
            model_hooks: list[tuple[Any, Callable]] = []
            for name, fn in fwd_hooks:
                target = own if isinstance(name, str) and name in split.points else model_hooks
                target.append((name, fn))
            fwd_hooks = split.around(model_hooks)
        grouped: dict[str, list[Callable]] = {}
        others: list[tuple[Any, Callable]] = []
        for name, fn in fwd_hooks:
            if isinstance(name, str):
                grouped.setdefault(name, []).append(fn)
            else:
                others.append((name, _returning([fn])))
        chained = [(name, _returning(fns)) for name, fns in grouped.items()]
        with ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=NORM_PATH_WARNING)
            if split is not None:
                stack.enter_context(split.attached(own))
            stack.enter_context(self.model.hooks(fwd_hooks=chained + others))
            yield

    def stream(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        stop_at_layer: int,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The stream after ``stop_at_layer`` blocks. A bridge returns nothing for
        ``stop_at_layer = n_layers`` (no block raises its stop), so the full run stops itself
        where the final norm (or the unembedding) would read the stream, with the bridge's own
        ``StopAtLayerException``: the stream as it flows on (after any hooks already on it),
        without the final norm and the ``d_vocab``-wide unembedding a ``HookedTransformer``
        skips too."""
        if stop_at_layer < self.n_layers:
            return self.model(tokens, attention_mask=attention_mask, stop_at_layer=stop_at_layer)
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def stop(value: Tensor, hook: Any) -> None:
            raise StopAtLayerException(value)

        reader = "ln_final.hook_in" if "ln_final.hook_in" in self.hook_points else None
        reader = reader or "unembed.hook_in"
        with self.model.hooks(fwd_hooks=[(reader, stop)]):
            return self.model(tokens, attention_mask=attention_mask, return_type=None)


def _returning(fns: list[Callable]) -> Callable:
    """One hook running ``fns`` in order, each on the previous one's result (or on what it saw,
    where it returned ``None``), returning what flows on."""

    def hook(value: Any, hook: Any) -> Any:
        for fn in fns:
            out = fn(value, hook=hook)
            value = value if out is None else out
        return value

    return hook


def _norm_kind(component: Any) -> NormKind:
    """The kind of a bridge norm component, from its class and what it wraps."""
    name = type(component).__name__
    inner = getattr(component, "original_component", None)
    if name == "LayerNormPreBridge":
        return "LNPre"
    if name == "RMSNormPreBridge":
        return "RMSPre"
    if isinstance(inner, torch.nn.Identity) or name == "GeneralizedComponent":
        return "none"
    if hasattr(component, "uses_rms_norm") and hasattr(component, "hook_scale"):
        return "RMS" if component.uses_rms_norm else "LN"
    raise UnsupportedModelError(f"normalisation component {name!r} is not supported by DePass")


def _activation(mlp: Any, layer: int) -> Any:
    """The wrapped MLP's activation function (HF ``act_fn``/``act``, the native ``act``)."""
    inner = mlp.original_component
    for attr in _ACT_ATTRS:
        fn = getattr(inner, attr, None)
        if callable(fn):
            return fn
    raise UnsupportedModelError(
        f"blocks.{layer}.mlp wraps {type(inner).__name__}, whose activation function DePass "
        f"cannot find (looked for {', '.join(_ACT_ATTRS)})"
    )


def _position_ids(y: Tensor, attention_mask: Tensor | None) -> Int[Tensor, "n pos"]:
    """Positions the model uses: ``arange``, or, for rows with padding before a real token,
    positions counted over the real tokens (what the bridge passes the wrapped model)."""
    n, n_pos = y.shape[0], y.shape[1]
    arange = torch.arange(n_pos, device=y.device).expand(n, n_pos)
    if attention_mask is None:
        return arange
    mask = attention_mask.long().to(y.device)
    derived = (mask.cumsum(-1) - 1).clamp(min=0)
    shifted = ((mask[:, 1:] == 1) & (mask[:, :-1] == 0)).any(-1, keepdim=True)
    return torch.where(shifted, derived, arange)


def unsupported_settings(model: Any) -> list[str]:
    """Settings of a bridge that change the computation in a way DePass cannot reproduce."""
    cfg = model.cfg
    problems = []
    spread = device_spread(model)
    if spread is not None:
        problems.append(spread)
    if getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts layers on a TransformerBridge")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("load_in_4bit (quantised weights)")
    if getattr(cfg, "attention_dir", "causal") != "causal":
        problems.append(f"attention_dir={cfg.attention_dir!r} (only causal models are supported)")
    if not getattr(model, "_has_registered_blocks", lambda: True)():
        problems.append("no standard `blocks` stack")
    if not cfg.attn_only and not cfg.d_mlp:
        problems.append("d_mlp unset on a model with MLPs")
    if any("ln" in block.mlp._modules for block in model.blocks if "mlp" in block._modules):
        problems.append("SoLU-LN MLPs on a TransformerBridge (it exposes no mlp.hook_mid)")
    style: Literal["standard", "rotary"] | str = str(cfg.positional_embedding_type or "standard")
    if style not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={style!r}")
    return problems


__all__ = ["BridgeAdapter", "enable_compatibility", "unsupported_settings"]
