"""The adapter protocol: everything DePass reads from a model, in backend-neutral terms.

Sources, targets, the engine and the evaluation talk only to a :class:`ModelAdapter`: config
values, per-layer weights (by reference, never copied), hook names and the few model calls the
adjoint pass needs. Two implementations sit behind it, one per TransformerLens generation:
:class:`~depass_lens.adapters.hooked.HookedAdapter` (3.x ``HookedTransformer``) and
:class:`~depass_lens.adapters.bridge.BridgeAdapter` (4.x ``TransformerBridge`` in
compatibility mode). Every difference between the two lives in those two modules; this one holds
the weight views both return and the logic both share (hook order, which cache entries are
frozen, where attention reads its input).

Both backends keep TransformerLens's hook names, ``ActivationCache``, ``run_with_cache``,
``run_with_hooks``, ``hooks()``, ``to_tokens`` and ``tokenizer``, so callers use those on the
model directly; what differs (config fields, weight layout, norm classes, rotary code) is read
through the adapter.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.errors import DePassInputError, UnsupportedModelError

NormKind = Literal["LN", "LNPre", "RMS", "RMSPre", "none"]
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
Stage = Literal["pre", "mid", "post"]

#: Architectures where TransformerLens applies ``ln1``/``ln2`` to the sublayer *output* (OLMo 2/3).
POST_NORM_ARCHITECTURES = frozenset({"Olmo2ForCausalLM", "Olmo3ForCausalLM"})
#: Architectures whose QK norm acts on the whole ``head * d_head`` query/key vector (OLMo family).
QK_FULL_NORM_ARCHITECTURES = frozenset({"OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"})

#: A TransformerLens model: a 3.x ``HookedTransformer`` or a 4.x ``TransformerBridge``. Typed
#: loosely on purpose: neither class can be imported under the other generation.
TLModel = Any

#: ``rotate(y, attention_mask)``: rotary embedding of queries or keys ``[n, pos, head, d_head]``.
Rotary = Callable[[Tensor, "Tensor | None"], Tensor]


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
    over the full ``head * d_head`` vector (OLMo), or not at all. ``rotary`` applies the model's
    own rotary embedding (``None``: no rotary), ``logn`` its log-n query scaling (``None``:
    none); both come from the backend's own code, so the decomposed scores rotate exactly as the
    real ones.
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
    rotary: Rotary | None = None
    logn: Callable[[Tensor], Tensor] | None = None


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


def as_tensor(value: object, name: str) -> Tensor:
    """A weight as a tensor; anything else (e.g. a quantised module) is unsupported."""
    if not isinstance(value, Tensor):
        raise UnsupportedModelError(f"weight {name} is a {type(value).__name__}, not a tensor")
    return value


def parameter_versions(params: Iterable[Tensor]) -> tuple[tuple[int, int, int], ...]:
    """Identity, storage and in-place version of each parameter: a key that changes when one is
    replaced, moved, cast or edited in place (for caches of what is read from the weights)."""
    return tuple((id(p), p.data_ptr(), p._version) for p in params)


def device_spread(model: Any) -> str | None:
    """Why ``model`` runs on more than one device (``None``: it runs on one).

    DePass keeps every component of the stream beside the real activations and frozen
    quantities, and its weights' views are read per layer; a model spread over devices
    (``HookedTransformer``'s ``n_devices``, a bridge loaded with a ``device_map``) would move
    tensors between them mid-propagation or fail with a device mismatch, so it is refused by
    name until every component follows its layer's device."""
    n_devices = getattr(getattr(model, "cfg", None), "n_devices", 1) or 1
    if n_devices > 1:
        return f"n_devices={n_devices} (layers spread over several devices)"
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) > 1:
        where = getattr(getattr(model, "original_model", None), "hf_device_map", None)
        how = "a device_map" if where else "parameters moved apart"
        return (
            f"a model on several devices ({', '.join(devices)}; {how}); move it to one device "
            "(e.g. model.to('cuda')) first"
        )
    return None


class ModelAdapter(ABC):
    """Read-only view of a TransformerLens model in the terms DePass needs.

    Weights are returned by reference (never copied), so memory stays that of the model and a
    change to the model is visible immediately (the cache check then catches stale caches).
    Subclasses implement the abstract reads for one backend; build one with
    :func:`~depass_lens.adapters.make_adapter`.
    """

    #: Short name of the backend, for messages and reports ("HookedTransformer", ...).
    backend: str = "?"

    def __init__(self, model: Any):
        self.model = model
        self._splitting = False  # inside split_inputs(): per-head inputs DePass itself manages

    # ---------------------------------------------------------------- config
    @property
    def cfg(self) -> Any:
        """The model's own config object. Only for TransformerLens machinery that reads it
        itself (``ActivationCache`` key resolution); DePass reads config through the
        properties below."""
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_mlp(self) -> int:
        return int(self.cfg.d_mlp or 0)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def eps(self) -> float:
        return float(self.cfg.eps)

    @property
    def model_name(self) -> str:
        return str(getattr(self.cfg, "model_name", None) or type(self.model).__name__)

    @property
    def default_prepend_bos(self) -> bool:
        return bool(self.cfg.default_prepend_bos)

    @property
    def attn_only(self) -> bool:
        return bool(self.cfg.attn_only)

    @property
    def parallel(self) -> bool:
        return bool(self.cfg.parallel_attn_mlp)

    @property
    @abstractmethod
    def post_norm(self) -> bool:
        """``ln1``/``ln2`` normalise the sublayer *output* (OLMo 2/3 style)."""

    @property
    def has_resid_mid(self) -> bool:
        return not self.attn_only and not self.parallel

    @property
    def positional(self) -> str:
        """``standard``, ``shortformer``, ``rotary``, ``alibi``, ..."""
        return str(self.cfg.positional_embedding_type)

    @property
    def attn_scores_soft_cap(self) -> float:
        """The attention-score soft cap (0: none)."""
        return float(getattr(self.cfg, "attn_scores_soft_cap", 0.0) or 0.0)

    @property
    def output_logits_soft_cap(self) -> float:
        """The output-logit soft cap (0: none); DePass reads logits out before it."""
        return float(getattr(self.cfg, "output_logits_soft_cap", 0.0) or 0.0)

    def local_attention(self, layer: int) -> bool:
        """Whether ``layer`` attends within a local window (its pattern masks more than causal)."""
        types = getattr(self.cfg, "attn_types", None)
        return bool(getattr(self.cfg, "use_local_attn", False)) and (
            types is not None and types[layer] == "local"
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding_weight.device

    def precision(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype whose rounding bounds how exactly a model run in ``dtype`` is reproduced:
        ``dtype`` itself unless the backend computes parts of the model in lower precision."""
        return dtype

    @property
    def embedding_weight(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.model.W_E

    # ---------------------------------------------------------------- hook names
    @staticmethod
    def resid_hook(layer: int, stage: Stage) -> str:
        return f"blocks.{layer}.hook_resid_{stage}"

    def hook_names(self) -> list[str]:
        """Every hook point of the model, by its TransformerLens name."""
        return list(self.model.hook_dict)

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

    @abstractmethod
    def final_query_key_hooks(self, layer: int) -> tuple[str, str] | None:
        """Hooks holding a layer's queries and keys exactly as the scores use them (rotated, QK
        normed), or ``None`` where the backend changes them after its last hook."""

    # ---------------------------------------------------------------- weights
    @abstractmethod
    def block_norms(self, layer: int) -> dict[str, NormWeights | None]:
        """``ln1``, ``ln2``, ``ln1_post``, ``ln2_post`` of a block (``None``: absent)."""

    @abstractmethod
    def final_norm(self) -> NormWeights:
        """The final norm (kind ``none`` where the model has none)."""

    @abstractmethod
    def attention(self, layer: int) -> AttentionWeights:
        """The value/output weights of ``layer``'s attention."""

    @abstractmethod
    def qk_problems(self) -> list[str]:
        """Settings the QK path cannot follow (empty when it can)."""

    def check_qk_supported(self) -> None:
        """Raise :class:`UnsupportedModelError` naming settings the QK path cannot follow."""
        problems = self.qk_problems()
        if problems:
            raise UnsupportedModelError(
                "the QK circuit of this model cannot be decomposed exactly. Unsupported "
                "setting(s): " + "; ".join(problems)
            )

    @abstractmethod
    def qk(self, layer: int) -> QKWeights:
        """The query/key weights of ``layer`` (raises for settings the QK path cannot follow)."""

    @abstractmethod
    def mlp(self, layer: int) -> MLPWeights:
        """The dense MLP of ``layer``."""

    @property
    def is_moe(self) -> bool:
        """Mixture-of-experts MLPs: routing is frozen, experts split."""
        return False

    def moe(self, layer: int) -> MoEWeights:
        raise UnsupportedModelError(f"{self.backend} models have no mixture-of-experts layers here")

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    @abstractmethod
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias (zeros where the model has none)."""

    # ---------------------------------------------------------------- model calls
    def to_tokens(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> Int[Tensor, "batch pos"]:
        """``model.to_tokens`` without its silent cut at ``n_ctx``: a prompt longer than the
        context keeps every token, so the length check refuses it instead of explaining a prefix
        (TransformerLens truncates by default)."""
        kwargs: dict[str, Any] = {"truncate": False}
        if prepend_bos is not None:
            kwargs["prepend_bos"] = prepend_bos
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        return self.model.to_tokens(text, **kwargs)

    def _backend_hook(self, handle: Any) -> bool:
        """Whether a hook on a hook point was put there by the backend itself (not a user)."""
        return False

    def foreign_hooks(self) -> list[str]:
        """The model's hook points that carry hooks DePass did not add (``add_hook``,
        ``add_perma_hook``, an open ``hooks()`` context), each as ``'name' (n fwd, m bwd)``;
        a hook point with several names (a bridge's aliases) lists them all. Called on every
        DePass entry, before DePass adds its own, so it stays a scan of the hook lists."""
        points: dict[int, tuple[list[str], int, int]] = {}
        for name, point in self.model.hook_dict.items():
            fwd = getattr(point, "fwd_hooks", ())
            bwd = getattr(point, "bwd_hooks", ())
            if not fwd and not bwd:
                continue
            n_fwd = sum(not self._backend_hook(h) for h in fwd)
            n_bwd = sum(not self._backend_hook(h) for h in bwd)
            if n_fwd or n_bwd:
                names = points.setdefault(id(point), ([], n_fwd, n_bwd))[0]
                names.append(name)
        found = []
        for names, n_fwd, n_bwd in points.values():
            counts = ", ".join(
                f"{n} {kind}" for n, kind in ((n_fwd, "forward"), (n_bwd, "backward")) if n
            )
            found.append(" = ".join(repr(n) for n in names) + f" ({counts})")
        return found

    def refuse_foreign_hooks(self) -> None:
        """Raise :class:`DePassInputError` naming every hook a user left on the model.

        A hook changes the model's forward pass, and DePass reads that pass in more than one
        way (frozen values from a run of the model, weights read directly, an adjoint pass of
        its own): no mode can honour it consistently, so every entry refuses it by name."""
        found = self.foreign_hooks()
        if found:
            raise DePassInputError(
                f"the model carries hooks DePass did not add, on {', '.join(found)}. DePass "
                "explains the model's own forward pass, and a hook changes that pass in some of "
                "the places DePass reads it and not in others. Remove them first "
                "(model.reset_hooks(); hooks added with add_perma_hook need "
                "model.reset_hooks(including_permanent=True)); to intervene on the decomposed "
                "pass instead, pass fwd_hooks= to DePass.run"
            )

    def hooks(self, fwd_hooks: list[tuple[Any, Callable]]) -> Any:
        """``model.hooks(fwd_hooks=...)``, with hook functions that see and keep on the graph the
        very tensor that flows on (a function returning ``None`` leaves it unchanged)."""
        return self.model.hooks(fwd_hooks=fwd_hooks)

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """The token embeddings of ``tokens`` (what ``hook_embed`` should hold)."""
        return self.model.embed(tokens)

    def stream(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        stop_at_layer: int,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after ``stop_at_layer`` blocks, under whatever hooks are active."""
        return self.model(
            tokens, attention_mask=attention_mask, stop_at_layer=stop_at_layer, return_type=None
        )

    def apply_final_norm(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The final norm of the model applied to ``resid`` (identity without one)."""
        if self.final_norm().kind == "none":
            return resid
        return self.model.ln_final(resid)

    def head_projections(self, layer: int) -> dict[str, Float[Tensor, "head d_model d_head"]]:
        """``layer``'s query, key and value weights per query head (``"q"``, ``"k"``, ``"v"``;
        grouped keys and values repeated), as they act on the attention input."""
        raise UnsupportedModelError(f"{self.backend} models expose no per-head projections")

    @contextmanager
    def split_inputs(self, per_head: bool = True) -> Iterator[None]:
        """Run the model on per-node inputs for the duration of the block (see subclasses);
        ``per_head=False``: the MLP's own input only, attention reading its shared input."""
        raise UnsupportedModelError(f"{self.backend} models cannot run on per-head inputs")
        yield  # pragma: no cover

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The model's weights by their TransformerLens names (``blocks.0.mlp.W_in``, ...)."""
        return self.model.named_parameters()

    def parameter_fingerprint(self) -> tuple[tuple[int, int, int], ...]:
        """:func:`parameter_versions` of every parameter: changes when the model is edited."""
        return parameter_versions(self.model.parameters())


__all__ = [
    "QK_FULL_NORM_ARCHITECTURES",
    "POST_NORM_ARCHITECTURES",
    "AttentionWeights",
    "MLPWeights",
    "ModelAdapter",
    "MoEWeights",
    "NormKind",
    "NormWeights",
    "QKWeights",
    "Rotary",
    "Stage",
    "TLModel",
    "as_tensor",
    "parameter_versions",
]
