"""Where an SAE sits in the model, and the linear map from its output space to the stream.

Three kinds of output hook, one rule: the SAE's reconstruction space maps *linearly* into the
residual stream at a start hook, where the engine picks the decomposition up.

- ``stream``: ``hook_resid_pre/mid/post``. The map is the identity; the start is the hook itself.
- ``output``: ``hook_attn_out`` / ``hook_mlp_out`` (MLP-output SAEs and transcoders). The map is
  the identity; the start is where that output has just been added, and the stream before it is
  a ``rest`` component.
- ``z``: ``attn.hook_z`` (attention-output SAEs). The map is ``W_O`` summed over heads, then any
  post-attention norm with its frozen scale; ``b_O`` and the norms' biases join ``bias``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.errors import DePassInputError
from depass_lens.frozen import Activations
from depass_lens.norms import post_norm_scale_hooks, post_sublayer_norms, pull_back, through_norms
from depass_lens.sae.view import SAEView

Kind = Literal["stream", "output", "z"]
_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_OUT_KINDS: dict[str, Kind] = {
    "hook_resid_pre": "stream",
    "hook_resid_mid": "stream",
    "hook_resid_post": "stream",
    "hook_attn_out": "output",
    "hook_mlp_out": "output",
    "attn.hook_z": "z",
}
#: Input hooks an SAE may encode from (a transcoder reads the MLP's input).
_IN_HOOKS = (*_OUT_KINDS, "ln2.hook_normalized", "hook_mlp_in", "ln1.hook_normalized")


@dataclass(frozen=True)
class Placement:
    """An SAE's place in one model: its layer, hooks and the kind of its output space."""

    layer: int
    kind: Kind
    hook_in: str
    hook_out: str
    start: str

    def d_of(self, adapter: ModelAdapter, hook: str) -> int:
        return (
            adapter.n_heads * adapter.cfg.d_head
            if hook.endswith("attn.hook_z")
            else (adapter.d_model)
        )

    def needed_hooks(self, adapter: ModelAdapter) -> list[str]:
        names = [self.hook_in, self.hook_out, self.start]
        if self.kind == "z":
            names += post_norm_scale_hooks(adapter, self.layer, "attn")
        return list(dict.fromkeys(names))

    def read(self, acts: Activations, hook: str) -> Float[Tensor, "batch pos d"]:
        """An activation in the SAE's flat space (``hook_z`` heads flattened)."""
        value = acts[hook]
        if value.ndim == 4:
            value = einops.rearrange(value, "b p h e -> b p (h e)")
        return value

    def to_stream(
        self,
        adapter: ModelAdapter,
        acts: Activations,
        parts: Float[Tensor, "batch comp pos d_out"],
        constant: Float[Tensor, "batch pos d_out"],
    ) -> tuple[Float[Tensor, "batch comp pos d_model"], Float[Tensor, "batch pos d_model"]]:
        """Send output-space parts (linear) and a constant (affine: + b_O, norm biases)."""
        if self.kind != "z":
            return parts, constant
        weights = adapter.attention(self.layer)
        W_O = weights.W_O.to(parts.dtype)
        heads = adapter.n_heads
        parts = einops.einsum(
            einops.rearrange(parts, "b c p (h e) -> b c p h e", h=heads),
            W_O,
            "b c p h e, h e d -> b c p d",
        )
        constant = einops.einsum(
            einops.rearrange(constant, "b p (h e) -> b p h e", h=heads),
            W_O,
            "b p h e, h e d -> b p d",
        ) + weights.b_O.to(parts.dtype)
        return through_norms(
            acts, post_sublayer_norms(adapter, self.layer, "attn"), parts, constant
        )

    def pull_back(
        self, adapter: ModelAdapter, acts: Activations, grad: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_out"]:
        """The transpose of :meth:`to_stream`'s linear part applied to a stream gradient."""
        if self.kind != "z":
            return grad
        grad = pull_back(acts, post_sublayer_norms(adapter, self.layer, "attn"), grad)
        W_O = adapter.attention(self.layer).W_O.to(grad.dtype)
        per_head = einops.einsum(grad, W_O, "b p d, h e d -> b p h e")
        return einops.rearrange(per_head, "b p h e -> b p (h e)")


def _split(hook: str, what: str) -> tuple[int, str]:
    match = _HOOK.match(hook)
    if match is None:
        raise DePassInputError(f"{what}: hook {hook!r} is not a block hook (blocks.L.<name>)")
    return int(match.group(1)), match.group(2)


def place(view: SAEView, adapter: ModelAdapter, what: str = "SAE") -> Placement:
    """Check the SAE against the model (hooks exist, widths match) and find its start hook."""
    hook_dict = adapter.model.hook_dict
    for hook in (view.hook_in, view.hook_out):
        if hook not in hook_dict:
            raise DePassInputError(
                f"{what} {view.name!r} is for hook {hook!r}, which this model does not have "
                f"(it has {adapter.n_layers} layers; e.g. 'blocks.0.hook_resid_post')"
            )
    layer, name = _split(view.hook_out, what)
    in_layer, in_name = _split(view.hook_in, what)
    if name not in _OUT_KINDS:
        raise DePassInputError(
            f"{what} {view.name!r} writes {view.hook_out!r}; supported output hooks are "
            f"{sorted(_OUT_KINDS)} (resid, attention/MLP outputs, attn.hook_z)"
        )
    if in_name not in _IN_HOOKS or (view.is_transcoder and in_layer != layer):
        raise DePassInputError(
            f"{what} {view.name!r} reads {view.hook_in!r}; an SAE reads its own hook and a "
            "transcoder the MLP input of its own layer (ln2.hook_normalized, hook_mlp_in or "
            "hook_resid_mid)"
        )
    kind = _OUT_KINDS[name]
    if kind == "stream":
        start = view.hook_out
    elif name == "hook_mlp_out":
        start = f"blocks.{layer}.hook_resid_post"
    else:
        start = adapter.after_attention_hook(layer)
    placement = Placement(layer, kind, view.hook_in, view.hook_out, start)
    for hook, width, side in (
        (view.hook_in, view.d_in, "d_in"),
        (view.hook_out, view.d_out, "d_out"),
    ):
        expected = placement.d_of(adapter, hook)
        if width != expected:
            raise DePassInputError(
                f"{what} {view.name!r} has {side}={width}, but {hook!r} of this model has "
                f"width {expected}: the SAE was trained on another model or hook"
            )
    if view.W_skip is not None and tuple(view.W_skip.shape) != (view.d_out, view.d_in):
        raise DePassInputError(
            f"{what} {view.name!r}: W_skip must be [d_out, d_in], got {tuple(view.W_skip.shape)}"
        )
    return placement


def encode(
    view: SAEView, placement: Placement, acts: Activations, dtype: torch.dtype
) -> Float[Tensor, "batch pos d_sae"]:
    """The SAE's latent activations on the real input, by its own encoder, in ``dtype``."""
    x = acts[placement.hook_in] if view.heads_axis else placement.read(acts, placement.hook_in)
    with torch.no_grad():
        out = view.encode(x.to(device=view.W_enc.device, dtype=view.W_enc.dtype))
    if isinstance(out, Tensor) and out.is_sparse:
        out = out.to_dense()
    if not isinstance(out, Tensor) or out.shape != (*x.shape[:2], view.d_sae):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DePassInputError(
            f"SAE {view.name!r}: encode returned {shape}, expected [batch, pos, d_sae={view.d_sae}]"
        )
    if not torch.isfinite(out).all():
        raise DePassInputError(f"SAE {view.name!r}: encode returned NaN or inf")
    return out.to(device=x.device, dtype=dtype)


__all__ = ["Placement", "encode", "place"]
