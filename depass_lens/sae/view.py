"""What DePass reads from a sparse autoencoder, whatever library made it.

An SAE (or transcoder) is read through a duck-typed protocol, so the core never imports SAELens:
any object with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, an
``encode(x)`` and a hook name works. The hook name is taken from ``hook_name``,
``cfg.metadata.hook_name`` (SAELens 6) or ``cfg.hook_name`` (SAELens <= 5); a transcoder's output
hook from the matching ``hook_name_out``. Gated SAEs (``b_gate``, ``b_mag``, ``r_mag``), JumpReLU,
TopK (including ``rescale_acts_by_decoder_norm``) and skip transcoders (``W_skip``) are read with
their own pre-activation and decoder, because DePass needs both as linear maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.errors import DePassInputError

Encoder = Callable[[Tensor], Tensor]


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _hook_from(sae: Any, attr: str) -> str | None:
    """A hook name from the object itself, SAELens 6's ``cfg.metadata`` or older ``cfg``."""
    for path in ((attr,), ("cfg", "metadata", attr), ("cfg", attr)):
        value = _get(sae, *path)
        if isinstance(value, str) and value:
            return value
    return None


def _tensor(sae: Any, name: str, what: str) -> Tensor | None:
    value = getattr(sae, name, None)
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise DePassInputError(f"{what}: {name} must be a tensor, got {type(value).__name__}")
    value = value.detach()
    if value.is_sparse:
        value = value.to_dense()
    if not torch.isfinite(value).all():
        raise DePassInputError(f"{what}: {name} contains NaN or inf; the SAE's weights are broken")
    return value


@dataclass
class SAEView:
    """An SAE as DePass needs it: weights, hooks, its encoder and its pre-activation map.

    Attributes:
        name: a short label (for components and targets).
        hook_in: where ``encode`` reads (a transcoder's MLP input; otherwise the SAE's hook).
        hook_out: where the reconstruction lives (``hook_in`` except for transcoders).
        W_enc: ``[d_in, d_sae]``, the pre-activation weights (gated: the magnitude path's).
        b_enc: ``[d_sae]``, the pre-activation bias (gated: ``b_mag``).
        W_dec: ``[d_sae, d_out]``, each latent's decoder vector as it is used in decoding.
        b_dec: ``[d_out]``.
        subtract_b_dec: whether ``b_dec`` is subtracted from the input before encoding.
        W_skip: ``[d_out, d_in]`` of a skip transcoder, else ``None``.
        encode: the SAE's own encoder (``[..., d_in] -> [..., d_sae]``).
        heads_axis: ``encode`` wants ``hook_z`` unflattened (``[..., head, d_head]``).
    """

    name: str
    hook_in: str
    hook_out: str
    W_enc: Float[Tensor, "d_in d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    W_dec: Float[Tensor, "d_sae d_out"]
    b_dec: Float[Tensor, " d_out"]
    subtract_b_dec: bool
    W_skip: Float[Tensor, "d_out d_in"] | None
    encode: Encoder
    heads_axis: bool = False

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def is_transcoder(self) -> bool:
        return self.hook_in != self.hook_out

    def check_latent(self, latent: int, what: str) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int):
            raise DePassInputError(f"{what}: a latent index must be an int, got {latent!r}")
        if not 0 <= latent < self.d_sae:
            raise DePassInputError(
                f"{what}: latent {latent} is out of range for an SAE with d_sae={self.d_sae} "
                f"(0..{self.d_sae - 1})"
            )
        return latent

    def pre_activation(
        self, latent: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Float[Tensor, " d_in"], float]:
        """``(w, c)`` with the latent's pre-activation ``= <w, x> + c`` for input ``x``."""
        w = self.W_enc[:, latent].to(device=device, dtype=dtype)
        c = self.b_enc[latent].to(device=device, dtype=dtype)
        if self.subtract_b_dec:
            c = c - (self.b_dec.to(device=device, dtype=dtype) * w).sum()
        return w, float(c)


def as_sae_view(
    sae: Any, hook: str | None = None, hook_out: str | None = None, name: str | None = None
) -> SAEView:
    """Read ``sae`` through the duck-typed protocol, validating its weights.

    ``hook`` / ``hook_out`` override the hook names the object carries. Raises
    :class:`~depass_lens.errors.DePassInputError` naming what is missing or inconsistent.
    """
    if isinstance(sae, SAEView):
        return sae
    what = f"SAE {type(sae).__name__}"
    hook_in = hook or _hook_from(sae, "hook_name")
    if hook_in is None:
        raise DePassInputError(
            f"{what} has no hook name (looked for hook_name, cfg.metadata.hook_name and "
            "cfg.hook_name); pass hook='blocks.L.hook_resid_post' (or the SAE's hook)"
        )
    out = hook_out or _hook_from(sae, "hook_name_out") or hook_in
    encode = getattr(sae, "encode", None)
    if not callable(encode):
        raise DePassInputError(f"{what} has no encode(x) function")
    W_enc = _tensor(sae, "W_enc", what)
    W_dec = _tensor(sae, "W_dec", what)
    b_dec = _tensor(sae, "b_dec", what)
    if W_enc is None or W_dec is None or b_dec is None:
        raise DePassInputError(f"{what} needs W_enc, W_dec and b_dec tensors")
    b_enc = _tensor(sae, "b_enc", what)
    b_mag, r_mag = _tensor(sae, "b_mag", what), _tensor(sae, "r_mag", what)
    if b_mag is not None and r_mag is not None:  # gated: the magnitude path is what fires
        W_enc, b_enc = W_enc * r_mag.exp(), b_mag
    if b_enc is None:
        b_enc = torch.zeros(W_enc.shape[-1], dtype=W_enc.dtype, device=W_enc.device)
    if W_enc.ndim != 2 or W_dec.ndim != 2 or W_enc.shape[1] != W_dec.shape[0]:
        raise DePassInputError(
            f"{what}: W_enc must be [d_in, d_sae] and W_dec [d_sae, d_out], got "
            f"{tuple(W_enc.shape)} and {tuple(W_dec.shape)}"
        )
    if b_enc.shape != (W_enc.shape[1],) or b_dec.shape != (W_dec.shape[1],):
        raise DePassInputError(
            f"{what}: b_enc must be [d_sae={W_enc.shape[1]}] and b_dec [d_out={W_dec.shape[1]}], "
            f"got {tuple(b_enc.shape)} and {tuple(b_dec.shape)}"
        )
    cfg = getattr(sae, "cfg", None)
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise DePassInputError(
            f"{what} normalises its input at run time (normalize_activations={norm!r}), which is "
            "not a fixed linear map; fold the scaling into the weights first (SAELens: "
            "sae.fold_activation_norm_scaling_factor(...))"
        )
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):  # TopK: decoded as a / |W_dec|
        norms = W_dec.norm(dim=-1)
        W_dec = W_dec / norms.unsqueeze(-1)
        W_enc, b_enc = W_enc * norms, b_enc * norms
    subtract = bool(getattr(cfg, "apply_b_dec_to_input", getattr(sae, "apply_b_dec_to_input", 0)))
    if subtract and W_enc.shape[0] != W_dec.shape[1]:
        raise DePassInputError(f"{what}: apply_b_dec_to_input needs d_in == d_out")
    return SAEView(
        name=name or _default_name(out),
        hook_in=hook_in,
        hook_out=out,
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        subtract_b_dec=subtract,
        W_skip=_tensor(sae, "W_skip", what),
        encode=encode,
        heads_axis=bool(getattr(sae, "hook_z_reshaping_mode", False)),
    )


def _default_name(hook: str) -> str:
    """``blocks.1.hook_resid_post`` -> ``L1.resid_post``; ``blocks.0.attn.hook_z`` -> ``L0.z``."""
    parts = hook.split(".")
    if len(parts) >= 3 and parts[0] == "blocks":
        return f"L{parts[1]}.{parts[-1].removeprefix('hook_')}"
    return hook


__all__ = ["SAEView", "as_sae_view"]
