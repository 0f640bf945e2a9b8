"""The TransformerLens 3.x adapter: reads a ``HookedTransformer``.

Weights are TransformerLens's own stacked parameters (``attn.W_Q`` ``[head d_model d_head]``,
``mlp.W_in`` ``[d_model d_mlp]``, ...), norms are its ``LayerNorm``/``RMSNorm``/...Pre modules,
rotary and log-n scaling are its attention module's own methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapters.base import (
    POST_NORM_ARCHITECTURES,
    QK_FULL_NORM_ARCHITECTURES,
    AttentionWeights,
    MLPWeights,
    ModelAdapter,
    MoEWeights,
    NormKind,
    NormWeights,
    QKWeights,
    as_tensor,
    device_spread,
)
from depass_lens.errors import UnsupportedModelError

_NORM_KINDS: dict[str, NormKind] = {
    "LayerNorm": "LN",
    "LayerNormPre": "LNPre",
    "RMSNorm": "RMS",
    "RMSNormPre": "RMSPre",
    "Identity": "none",
}


def _norm_kind(module: torch.nn.Module) -> NormKind:
    name = type(module).__name__
    if name not in _NORM_KINDS:
        raise UnsupportedModelError(f"normalisation layer {name!r} is not supported by DePass")
    return _NORM_KINDS[name]


class HookedAdapter(ModelAdapter):
    """Read-only view of a TransformerLens 3.x ``HookedTransformer``."""

    backend = "HookedTransformer"

    def __init__(self, model: Any):
        super().__init__(model)
        check_supported(model)

    # ---------------------------------------------------------------- config
    @property
    def post_norm(self) -> bool:
        return self.cfg.original_architecture in POST_NORM_ARCHITECTURES

    def final_query_key_hooks(self, layer: int) -> tuple[str, str] | None:
        prefix = f"blocks.{layer}.attn"
        if self.cfg.use_logn_attn:
            return None
        if self.positional == "rotary":
            return f"{prefix}.hook_rot_q", f"{prefix}.hook_rot_k"
        if self.qk(layer).norm_style == "none":
            return f"{prefix}.hook_q", f"{prefix}.hook_k"
        return None

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
        W_V, b_V = as_tensor(W_V, "W_V"), as_tensor(b_V, "b_V")
        return AttentionWeights(
            W_V=W_V,
            b_V=b_V,
            W_O=as_tensor(attn.W_O, "W_O"),
            b_O=as_tensor(attn.b_O, "b_O"),
            kv_repeat=self.n_heads // int(W_V.shape[0]),
        )

    def qk_problems(self) -> list[str]:
        problems = qk_unsupported_settings(self.model)
        if self._splitting:  # the split inputs are DePass's own: the QK path reads them per head
            problems = [p for p in problems if not p.startswith("use_split_qkv_input")]
        return problems

    def qk(self, layer: int) -> QKWeights:
        self.check_qk_supported()
        attn = self.model.blocks[layer].attn
        grouped = hasattr(attn, "_W_K") and not self.cfg.ungroup_grouped_query_attention
        W_K = as_tensor(attn._W_K if grouped else attn.W_K, "W_K")
        b_K = as_tensor(attn._b_K if grouped else attn.b_K, "b_K")
        prefix = f"blocks.{layer}.attn"
        q_norm = self._norm(getattr(attn, "q_norm", None), f"{prefix}.q_norm")
        k_norm = self._norm(getattr(attn, "k_norm", None), f"{prefix}.k_norm")
        style: Literal["none", "head", "full"] = "none"
        if q_norm is not None and self.cfg.original_architecture in QK_FULL_NORM_ARCHITECTURES:
            style = "full"
        elif q_norm is not None and self.cfg.use_qk_norm:
            style = "head"
        rotary = None
        if self.positional == "rotary":
            rotary = lambda y, mask: attn.apply_rotary(y, 0, mask)  # noqa: E731
        logn = (lambda y: attn._apply_logn_scaling(y, 0)) if self.cfg.use_logn_attn else None
        return QKWeights(
            W_Q=as_tensor(attn.W_Q, "W_Q"),
            b_Q=as_tensor(attn.b_Q, "b_Q"),
            W_K=W_K,
            b_K=b_K,
            kv_repeat=self.n_heads // int(W_K.shape[0]),
            q_norm=q_norm if style != "none" else None,
            k_norm=k_norm if style != "none" else None,
            norm_style=style,
            attn_scale=float(attn.attn_scale),
            rotary=rotary,
            logn=logn,
        )

    def head_projections(self, layer: int) -> dict[str, Float[Tensor, "head d_model d_head"]]:
        attn = self.model.blocks[layer].attn  # grouped keys and values come repeated per head
        names = {side: f"W_{side.upper()}" for side in "qkv"}
        return {side: as_tensor(getattr(attn, name), name) for side, name in names.items()}

    def mlp(self, layer: int) -> MLPWeights:
        mlp = self.model.blocks[layer].mlp
        gated = hasattr(mlp, "W_gate")
        inner = None
        if getattr(mlp, "ln", None) is not None:
            inner = self._norm(mlp.ln, f"blocks.{layer}.mlp.ln")
        return MLPWeights(
            W_in=as_tensor(mlp.W_in, "W_in"),
            b_in=as_tensor(mlp.b_in, "b_in"),
            W_out=as_tensor(mlp.W_out, "W_out"),
            b_out=as_tensor(mlp.b_out, "b_out"),
            W_gate=as_tensor(mlp.W_gate, "W_gate") if gated else None,
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
            W_in = as_tensor(expert.W_in.weight, "W_in").T
            zeros_in = W_in.new_zeros(W_in.shape[1])
            W_out = as_tensor(expert.W_out.weight, "W_out").T
            experts.append(
                MLPWeights(
                    W_in=W_in,
                    b_in=zeros_in,
                    W_out=W_out,
                    b_out=W_out.new_zeros(W_out.shape[1]),
                    W_gate=as_tensor(expert.W_gate.weight, "W_gate").T,
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
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.model.b_U

    @contextmanager
    def split_inputs(self, per_head: bool = True) -> Iterator[None]:
        """Run the model on per-node inputs for the duration of the block.

        TransformerLens's ``use_split_qkv_input`` gives every head its own query, key and value
        input (``blocks.L.hook_q_input`` ... ``[batch, pos, head, d_model]``), ``use_hook_mlp_in``
        a separate MLP input (``blocks.L.hook_mlp_in``), and ungrouping grouped-query attention
        gives every query head its own copy of its keys and values. Values are unchanged; what
        changes is that a hook on one of these inputs sees (and may replace) exactly what one node
        reads. ``per_head=False`` keeps the shared attention input (no ``d_model``-wide copy per
        head): a head's input is then reached through ``attn.hook_q``/``hook_k``/``hook_v``. The
        settings are restored afterwards, even on error.
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
            cfg.use_split_qkv_input = per_head
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


def _unsupported_settings(model: Any) -> list[str]:
    """Settings that change the computation in a way DePass cannot reproduce exactly."""
    cfg = model.cfg
    problems = []
    spread = device_spread(model)
    if spread is not None:
        problems.append(spread)
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


def qk_unsupported_settings(model: Any) -> list[str]:
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


def check_supported(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming every unsupported setting of ``model``."""
    problems = _unsupported_settings(model)
    if problems:
        raise UnsupportedModelError(
            "DePass cannot propagate this model exactly. Unsupported setting(s): "
            + "; ".join(problems)
        )


__all__ = ["HookedAdapter", "check_supported", "qk_unsupported_settings"]
