"""The one place that reads a TransformerLens model: config, weights per layer and hook names.

Everything else in depass_lens talks to a :class:`ModelAdapter`, never to ``model.blocks[...]``
directly, so a second adapter (e.g. for TransformerLens 4's ``TransformerBridge``, which keeps the
hook names and ``ActivationCache``) can be added without touching the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from depass_lens.errors import UnsupportedModelError

NormKind = Literal["LN", "LNPre", "RMS", "RMSPre", "none"]
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
Stage = Literal["pre", "mid", "post"]

#: Architectures where TransformerLens applies ``ln1``/``ln2`` to the sublayer *output* (OLMo 2/3).
POST_NORM_ARCHITECTURES = frozenset({"Olmo2ForCausalLM", "Olmo3ForCausalLM"})
#: Architectures whose QK norm acts on the whole ``head * d_head`` query/key vector (OLMo family).
QK_FULL_NORM_ARCHITECTURES = frozenset({"OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"})


@dataclass(frozen=True)
class NormWeights:
    """A normalisation layer as DePass sees it: kind, optional affine weights, scale hook."""

    kind: NormKind
    scale_hook: str | None
    w: Float[Tensor, " d"] | None = None
    b: Float[Tensor, " d"] | None = None

    @property
    def centres(self) -> bool:
        return self.kind in ("LN", "LNPre")


@dataclass(frozen=True)
class AttentionWeights:
    """Value/output path of one attention layer (the QK path is frozen in the pattern)."""

    W_V: Float[Tensor, "kv_head d_model d_head"]
    b_V: Float[Tensor, "kv_head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    kv_repeat: int


@dataclass(frozen=True)
class QKWeights:
    """Query/key path of one attention layer, for the QK circuit (scores are bilinear in it).

    ``norm_style`` says how a QK norm is applied: per head on ``d_head`` (Gemma 3, Qwen 3),
    over the full ``head * d_head`` vector (OLMo), or not at all. ``module`` is TransformerLens's
    attention module, whose own rotary and log-n code the QK path calls.
    """

    W_Q: Float[Tensor, "head d_model d_head"]
    b_Q: Float[Tensor, "head d_head"]
    W_K: Float[Tensor, "kv_head d_model d_head"]
    b_K: Float[Tensor, "kv_head d_head"]
    kv_repeat: int
    q_norm: NormWeights | None
    k_norm: NormWeights | None
    norm_style: Literal["none", "head", "full"]
    attn_scale: float
    module: torch.nn.Module


@dataclass(frozen=True)
class MLPWeights:
    """One dense MLP. ``W_gate`` is set for gated MLPs (``act(x W_gate) * (x W_in) + b_in``)."""

    W_in: Float[Tensor, "d_model d_mlp"]
    b_in: Float[Tensor, " d_mlp"]
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, " d_model"]
    W_gate: Float[Tensor, "d_model d_mlp"] | None
    act_fn: Callable[[Tensor], Tensor]
    inner_norm: NormWeights | None  # SoLU-LN: a LayerNorm on the activations

    @property
    def gated(self) -> bool:
        return self.W_gate is not None


@dataclass(frozen=True)
class MoEWeights:
    """A mixture-of-experts layer: gated experts and how the (frozen) router's weights are used."""

    experts: list[MLPWeights]
    experts_per_token: int
    renormalise: bool
    weights_hook: str


def _tensor(value: object, name: str) -> Tensor:
    """A weight as a tensor; anything else (e.g. a quantised module) is unsupported."""
    if not isinstance(value, Tensor):
        raise UnsupportedModelError(f"weight {name} is a {type(value).__name__}, not a tensor")
    return value


def _norm_kind(module: torch.nn.Module) -> NormKind:
    name = type(module).__name__
    kinds: dict[str, NormKind] = {
        "LayerNorm": "LN",
        "LayerNormPre": "LNPre",
        "RMSNorm": "RMS",
        "RMSNormPre": "RMSPre",
        "Identity": "none",
    }
    if name not in kinds:
        raise UnsupportedModelError(f"normalisation layer {name!r} is not supported by DePass")
    return kinds[name]


class ModelAdapter:
    """Read-only view of a ``HookedTransformer`` in the terms DePass needs.

    Weights are returned by reference (never copied), so memory stays that of the model and a
    change to the model is visible immediately (the cache check then catches stale caches).
    """

    def __init__(self, model: HookedTransformer):
        if not isinstance(model, HookedTransformer):
            raise TypeError(
                f"DePass wraps a transformer_lens.HookedTransformer, got {type(model).__name__}"
            )
        self.model = model
        self.cfg = model.cfg
        self._splitting = False  # inside split_inputs(): per-head inputs DePass itself manages
        check_supported(model)

    # ---------------------------------------------------------------- config
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.cfg.n_heads

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_mlp(self) -> int:
        return self.cfg.d_mlp or 0

    @property
    def attn_only(self) -> bool:
        return bool(self.cfg.attn_only)

    @property
    def parallel(self) -> bool:
        return bool(self.cfg.parallel_attn_mlp)

    @property
    def post_norm(self) -> bool:
        return self.cfg.original_architecture in POST_NORM_ARCHITECTURES

    @property
    def has_resid_mid(self) -> bool:
        return not self.attn_only and not self.parallel

    @property
    def positional(self) -> str:
        return self.cfg.positional_embedding_type

    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_E.dtype

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    # ---------------------------------------------------------------- hook names
    @staticmethod
    def resid_hook(layer: int, stage: Stage) -> str:
        return f"blocks.{layer}.hook_resid_{stage}"

    def hook_position(self, name: str) -> tuple[int, int]:
        """Where a hook sits in the forward pass, as ``(layer, step)``: comparable by order.

        The embedding is layer -1; the final norm and unembedding are layer ``n_layers``. Within a
        block: resid_pre, attention input and attention, attention output, resid_mid, MLP input
        and MLP, MLP output, resid_post (a parallel block's MLP reads resid_pre, so it sorts with
        the attention).
        """
        if name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            return (-1, 0)
        match = _BLOCK_HOOK.match(name)
        if match is None:
            return (self.n_layers, 0)
        layer, rest = int(match.group(1)), match.group(2)
        parallel_mlp = self.parallel and rest.startswith(("ln2.", "mlp."))
        steps = (
            (("hook_resid_pre",), 0),
            (("ln1_post.", "hook_attn_out"), 2),
            (("ln1.", "attn.", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"), 1),
            (("hook_resid_mid",), 3),
            (("ln2_post.", "hook_mlp_out"), 5),
            (("ln2.", "mlp.", "hook_mlp_in"), 4),
            (("hook_resid_post",), 6),
        )
        for prefixes, step in steps:
            if rest.startswith(prefixes):
                return (layer, 1 if parallel_mlp else step)
        return (layer, 6)

    def after_attention_hook(self, layer: int) -> str:
        """Where a layer's attention output has just been added to the stream."""
        return self.resid_hook(layer, "mid" if self.has_resid_mid else "post")

    def frozen_hook_names(self) -> list[str]:
        """Every cache entry forward-mode propagation reads (scales, patterns, MLP activations)."""
        names: list[str] = []
        for layer in range(self.n_layers):
            for norm in self.block_norms(layer).values():
                if norm is not None and norm.scale_hook is not None:
                    names.append(norm.scale_hook)
            names.append(f"blocks.{layer}.attn.hook_pattern")
            if self.is_moe:
                names.append(self.moe(layer).weights_hook)
            elif not self.attn_only:
                mlp = self.mlp(layer)
                names += [f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"]
                if mlp.gated:
                    names.append(f"blocks.{layer}.mlp.hook_pre_linear")
                if mlp.inner_norm is not None:
                    names.append(f"blocks.{layer}.mlp.hook_mid")
                    if mlp.inner_norm.scale_hook is not None:
                        names.append(mlp.inner_norm.scale_hook)
        final = self.final_norm()
        if final.scale_hook is not None:
            names.append(final.scale_hook)
        return names

    # ---------------------------------------------------------------- weights
    def _norm(self, module: torch.nn.Module | None, name: str) -> NormWeights | None:
        if module is None:
            return None
        kind = _norm_kind(module)
        if kind == "none":
            return NormWeights("none", None)
        w = getattr(module, "w", None) if kind in ("LN", "RMS") else None
        b = getattr(module, "b", None) if kind == "LN" else None
        return NormWeights(kind, f"{name}.hook_scale", w, b)

    def block_norms(self, layer: int) -> dict[str, NormWeights | None]:
        block = self.model.blocks[layer]
        prefix = f"blocks.{layer}"
        return {
            name: self._norm(getattr(block, name, None), f"{prefix}.{name}")
            for name in ("ln1", "ln2", "ln1_post", "ln2_post")
        }

    def final_norm(self) -> NormWeights:
        module = getattr(self.model, "ln_final", None)
        norm = self._norm(module, "ln_final")
        return norm if norm is not None else NormWeights("none", None)

    def attention(self, layer: int) -> AttentionWeights:
        attn = self.model.blocks[layer].attn
        grouped = hasattr(attn, "_W_V") and not self.cfg.ungroup_grouped_query_attention
        W_V = attn._W_V if grouped else attn.W_V
        b_V = attn._b_V if grouped else attn.b_V
        W_V, b_V = _tensor(W_V, "W_V"), _tensor(b_V, "b_V")
        return AttentionWeights(
            W_V=W_V,
            b_V=b_V,
            W_O=_tensor(attn.W_O, "W_O"),
            b_O=_tensor(attn.b_O, "b_O"),
            kv_repeat=self.n_heads // int(W_V.shape[0]),
        )

    def qk_problems(self) -> list[str]:
        """Settings the QK path cannot follow (empty when it can)."""
        problems = qk_unsupported_settings(self.model)
        if self._splitting:  # the split inputs are DePass's own: the QK path reads them per head
            problems = [p for p in problems if not p.startswith("use_split_qkv_input")]
        return problems

    def check_qk_supported(self) -> None:
        """Raise :class:`UnsupportedModelError` naming settings the QK path cannot follow."""
        problems = self.qk_problems()
        if problems:
            raise UnsupportedModelError(
                "the QK circuit of this model cannot be decomposed exactly. Unsupported "
                "setting(s): " + "; ".join(problems)
            )

    def qk(self, layer: int) -> QKWeights:
        """The query/key weights of ``layer`` (raises for settings the QK path cannot follow)."""
        self.check_qk_supported()
        attn = self.model.blocks[layer].attn
        grouped = hasattr(attn, "_W_K") and not self.cfg.ungroup_grouped_query_attention
        W_K = _tensor(attn._W_K if grouped else attn.W_K, "W_K")
        b_K = _tensor(attn._b_K if grouped else attn.b_K, "b_K")
        prefix = f"blocks.{layer}.attn"
        q_norm = self._norm(getattr(attn, "q_norm", None), f"{prefix}.q_norm")
        k_norm = self._norm(getattr(attn, "k_norm", None), f"{prefix}.k_norm")
        style: Literal["none", "head", "full"] = "none"
        if q_norm is not None and self.cfg.original_architecture in QK_FULL_NORM_ARCHITECTURES:
            style = "full"
        elif q_norm is not None and self.cfg.use_qk_norm:
            style = "head"
        return QKWeights(
            W_Q=_tensor(attn.W_Q, "W_Q"),
            b_Q=_tensor(attn.b_Q, "b_Q"),
            W_K=W_K,
            b_K=b_K,
            kv_repeat=self.n_heads // int(W_K.shape[0]),
            q_norm=q_norm if style != "none" else None,
            k_norm=k_norm if style != "none" else None,
            norm_style=style,
            attn_scale=float(attn.attn_scale),
            module=attn,
        )

    def attention_input_hook(self, layer: int) -> str:
        """Where the (normalised) stream that queries, keys and values read is exposed.

        ``ln1.hook_normalized`` (before the norm's weight and bias) where ``ln1`` normalises the
        attention input, else ``hook_resid_pre`` (no norm, or OLMo-style post-norm).
        """
        ln1 = self.block_norms(layer)["ln1"]
        if self.post_norm or ln1 is None or ln1.kind == "none":
            return self.resid_hook(layer, "pre")
        return f"blocks.{layer}.ln1.hook_normalized"

    def attention_input_norm(self, layer: int) -> NormWeights | None:
        """The weight/bias applied after :meth:`attention_input_hook` (``None``: none)."""
        if self.attention_input_hook(layer).endswith("hook_resid_pre"):
            return None
        return self.block_norms(layer)["ln1"]

    def qk_hook_names(self, layer: int) -> list[str]:
        """Cache entries the QK path of ``layer`` reads (its input, QK-norm scales, scores)."""
        prefix = f"blocks.{layer}.attn"
        names = [
            self.attention_input_hook(layer),
            f"{prefix}.hook_attn_scores",
            f"{prefix}.hook_pattern",
            f"{prefix}.hook_v",
        ]
        qk = self.qk(layer)
        if qk.norm_style != "none":
            names += [f"{prefix}.q_norm.hook_scale", f"{prefix}.k_norm.hook_scale"]
        if self.positional == "shortformer":
            names.append("hook_pos_embed")
        return names

    def final_query_key_hooks(self, layer: int) -> tuple[str, str] | None:
        """Hooks holding a layer's queries and keys exactly as the scores use them (rotated, QK
        normed), or ``None`` where TransformerLens changes them after its last hook."""
        prefix = f"blocks.{layer}.attn"
        if self.cfg.use_logn_attn:
            return None
        if self.positional == "rotary":
            return f"{prefix}.hook_rot_q", f"{prefix}.hook_rot_k"
        if self.qk(layer).norm_style == "none":
            return f"{prefix}.hook_q", f"{prefix}.hook_k"
        return None

    def mlp(self, layer: int) -> MLPWeights:
        mlp = self.model.blocks[layer].mlp
        gated = hasattr(mlp, "W_gate")
        inner = None
        if getattr(mlp, "ln", None) is not None:
            inner = self._norm(mlp.ln, f"blocks.{layer}.mlp.ln")
        return MLPWeights(
            W_in=_tensor(mlp.W_in, "W_in"),
            b_in=_tensor(mlp.b_in, "b_in"),
            W_out=_tensor(mlp.W_out, "W_out"),
            b_out=_tensor(mlp.b_out, "b_out"),
            W_gate=_tensor(mlp.W_gate, "W_gate") if gated else None,
            act_fn=mlp.act_fn,
            inner_norm=inner,
        )

    @property
    def is_moe(self) -> bool:
        """Mixture-of-experts MLPs (TransformerLens ``MoE``): routing is frozen, experts split."""
        return bool(getattr(self.cfg, "num_experts", None)) and not self.attn_only

    def moe(self, layer: int) -> MoEWeights:
        mlp = self.model.blocks[layer].mlp
        experts = []
        for expert in getattr(mlp, "experts", []):
            W_in = _tensor(expert.W_in.weight, "W_in").T
            zeros_in = W_in.new_zeros(W_in.shape[1])
            W_out = _tensor(expert.W_out.weight, "W_out").T
            experts.append(
                MLPWeights(
                    W_in=W_in,
                    b_in=zeros_in,
                    W_out=W_out,
                    b_out=W_out.new_zeros(W_out.shape[1]),
                    W_gate=_tensor(expert.W_gate.weight, "W_gate").T,
                    act_fn=expert.act_fn,
                    inner_norm=None,
                )
            )
        return MoEWeights(
            experts=experts,
            experts_per_token=int(self.cfg.experts_per_token or 1),
            renormalise=bool(getattr(self.cfg, "norm_topk_prob", False)),
            weights_hook=f"blocks.{layer}.mlp.hook_expert_weights",
        )

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.model.b_U

    @contextmanager
    def split_inputs(self) -> Iterator[None]:
        """Run the model on per-node inputs for the duration of the block.

        TransformerLens's ``use_split_qkv_input`` gives every head its own query, key and value
        input (``blocks.L.hook_q_input`` ... ``[batch, pos, head, d_model]``), ``use_hook_mlp_in``
        a separate MLP input (``blocks.L.hook_mlp_in``), and ungrouping grouped-query attention
        gives every query head its own copy of its keys and values. Values are unchanged; what
        changes is that a hook on one of these inputs sees (and may replace) exactly what one node
        reads. The settings are restored afterwards, even on error.
        """
        cfg = self.cfg
        saved = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention)
        if saved[0] or cfg.use_attn_in:
            raise UnsupportedModelError(
                "circuit graphs run the model on split inputs themselves; turn off "
                "use_split_qkv_input / use_attn_in on the model first"
            )
        try:
            self._splitting = True
            cfg.use_split_qkv_input = True
            cfg.use_hook_mlp_in = True
            cfg.ungroup_grouped_query_attention = True
            yield
        finally:
            self._splitting = False
            (
                cfg.use_split_qkv_input,
                cfg.use_hook_mlp_in,
                cfg.ungroup_grouped_query_attention,
            ) = saved

    def parameter_fingerprint(self) -> tuple[tuple[int, int], ...]:
        """Identity and in-place version of every parameter: changes when the model is edited."""
        return tuple((id(p), p._version) for p in self.model.parameters())


#: Settings that change the computation in a way DePass cannot reproduce exactly.
def _unsupported_settings(model: HookedTransformer) -> list[str]:
    cfg = model.cfg
    problems = []
    if getattr(cfg, "num_experts", None) and cfg.original_architecture == "GptOssForCausalLM":
        problems.append("GPT-OSS mixture-of-experts (clamped SwiGLU experts with biases)")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("clip_qkv (clamping of values is a nonlinearity on the value path)")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("load_in_4bit (quantised weights)")
    if cfg.attention_dir != "causal":
        problems.append(f"attention_dir={cfg.attention_dir!r} (only causal models are supported)")
    if cfg.use_normalization_before_and_after and cfg.normalization_type in ("LN", "LNPre"):
        problems.append(
            "use_normalization_before_and_after with LayerNorm (TransformerLens builds no post-norm"
            " module for it)"
        )
    if not cfg.attn_only and cfg.d_mlp is None:
        problems.append("d_mlp=None on a model with MLPs")
    return problems


def qk_unsupported_settings(model: HookedTransformer) -> list[str]:
    """Settings under which the QK path (scores as bilinear forms) is not reproduced exactly."""
    cfg = model.cfg
    problems = []
    if cfg.use_split_qkv_input or cfg.use_attn_in:
        problems.append("use_split_qkv_input / use_attn_in (per-head attention inputs)")
    if cfg.positional_embedding_type == "relative_positional_bias":
        problems.append("relative_positional_bias (position bias passed in at run time)")
    if getattr(cfg, "use_attention_sinks", False):
        problems.append("use_attention_sinks (the sink logit joins the softmax)")
    return problems


def check_supported(model: HookedTransformer) -> None:
    """Raise :class:`UnsupportedModelError` naming every unsupported setting of ``model``."""
    problems = _unsupported_settings(model)
    if problems:
        raise UnsupportedModelError(
            "DePass cannot propagate this model exactly. Unsupported setting(s): "
            + "; ".join(problems)
        )
