"""Random SAEs and transcoders for the SAE tests (no network, no SAELens needed)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.sae import SimpleSAE

#: SAE kind -> (hook template, reads the MLP input as a transcoder)
KINDS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "z": "blocks.{L}.attn.hook_z",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "transcoder": "blocks.{L}.hook_mlp_out",
}


def _fill(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random weights; decoder rows small, as in a trained SAE whose latents add up to x."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            size = scale / param.shape[0] ** 0.5 if name == "W_dec" else scale
            param.copy_((size * noise).to(param.dtype))


class RandomTranscoder(torch.nn.Module):
    """A duck-typed transcoder: reads ``ln2.hook_normalized``, writes ``hook_mlp_out``."""

    def __init__(self, d_in: int, d_sae: int, layer: int, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, dtype=dtype))
        _fill(self, seed)
        self.hook_name = f"blocks.{layer}.ln2.hook_normalized"
        self.hook_name_out = f"blocks.{layer}.hook_mlp_out"

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return torch.relu(x @ self.W_enc + self.b_enc)


class PlainSAE:
    """The bare protocol, not a module: weights, an encode function and a hook name."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec, hook_name):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = W_enc, b_enc, W_dec, b_dec
        self.hook_name = hook_name

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)


def make_sae(
    model,
    kind: str,
    layer: int = 1,
    d_sae: int = 40,
    architecture: str = "standard",
    seed: int = 0,
    **kwargs,
):
    """A random SAE of ``kind`` for ``model`` (its dtype), about half its latents active."""
    cfg = model.cfg
    dtype = cfg.dtype
    if kind == "transcoder":
        return RandomTranscoder(cfg.d_model, d_sae, layer, dtype, seed)
    hook = KINDS[kind].format(L=layer)
    d_in = cfg.n_heads * cfg.d_head if kind == "z" else cfg.d_model
    sae = SimpleSAE(d_in, d_sae, hook, architecture, dtype=dtype, **kwargs)
    _fill(sae, seed)
    if architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.abs_()
    return sae
