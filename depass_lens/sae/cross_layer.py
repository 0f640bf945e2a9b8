"""Cross-layer transcoders: one encoder per layer, decoders into that layer's and every later
layer's MLP output (circuit-tracer's and Anthropic's CLTs).

Layer ``l``'s latents read ``hook_in`` of layer ``l`` (the MLP input) and write
``W_dec[l][:, m - l]`` into the MLP output of every layer ``m >= l``; each layer's MLP output is
then replaced by the sum of what every earlier and its own layer's latents write, plus
``b_dec[m]``. Weights here are in SAELens's orientation (``W_enc [layer, d_in, d_sae]``,
``W_dec[l] [d_sae, n_layers - l, d_out]``). :func:`load_circuit_tracer_clt` reads
circuit-tracer's folder (``W_enc_{l}.safetensors``: ``W_enc_{l} [d_sae, d_model]``, ``b_enc_{l}``,
``b_dec_{l}``, ``threshold_{l}``; ``W_dec_{l}.safetensors``: ``W_dec_{l} [d_sae, n_layers - l,
d_model]``), offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor, nn

from depass_lens.errors import DePassInputError


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder with ReLU or JumpReLU latents (``threshold`` per latent).

    Args:
        W_enc: ``[n_layers, d_in, d_sae]``; b_enc: ``[n_layers, d_sae]``.
        W_dec: per layer ``l``, ``[d_sae, n_layers - l, d_out]`` (its own layer first).
        b_dec: ``[n_layers, d_out]``.
        threshold: ``[n_layers, d_sae]`` for JumpReLU, else ``None`` (ReLU).
        hook_in: where layer ``l``'s latents read, a template with ``{layer}``.
        hook_out: the MLP output each layer's decoders write, likewise.
    """

    def __init__(
        self,
        W_enc: Float[Tensor, "layer d_in d_sae"],
        b_enc: Float[Tensor, "layer d_sae"],
        W_dec: list[Tensor],
        b_dec: Float[Tensor, "layer d_out"],
        threshold: Float[Tensor, "layer d_sae"] | None = None,
        hook_in: str = "blocks.{layer}.ln2.hook_normalized",
        hook_out: str = "blocks.{layer}.hook_mlp_out",
    ):
        super().__init__()
        n_layers, d_in, d_sae = W_enc.shape
        if b_enc.shape != (n_layers, d_sae) or b_dec.ndim != 2 or b_dec.shape[0] != n_layers:
            raise DePassInputError(
                f"cross-layer transcoder: b_enc must be [{n_layers}, {d_sae}] and b_dec "
                f"[{n_layers}, d_out]; got {tuple(b_enc.shape)} and {tuple(b_dec.shape)}"
            )
        if len(W_dec) != n_layers:
            raise DePassInputError(
                f"cross-layer transcoder: {len(W_dec)} decoders for {n_layers} layers"
            )
        d_out = b_dec.shape[1]
        for layer, dec in enumerate(W_dec):
            if dec.shape != (d_sae, n_layers - layer, d_out):
                raise DePassInputError(
                    f"cross-layer transcoder: W_dec[{layer}] must be [{d_sae}, {n_layers - layer}, "
                    f"{d_out}] (its layer and every later one), got {tuple(dec.shape)}"
                )
        if threshold is not None and threshold.shape != (n_layers, d_sae):
            raise DePassInputError(
                f"cross-layer transcoder: threshold must be [{n_layers}, {d_sae}], got "
                f"{tuple(threshold.shape)}"
            )
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        self.W_dec = nn.ParameterList([nn.Parameter(d) for d in W_dec])
        self.b_dec = nn.Parameter(b_dec)
        self.threshold = None if threshold is None else nn.Parameter(threshold)
        self.hook_in, self.hook_out = hook_in, hook_out

    @property
    def n_layers(self) -> int:
        return int(self.W_enc.shape[0])

    def encode_layer(self, layer: int, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Layer ``layer``'s latent activations on its input ``x``."""
        pre = x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold[layer]).to(pre.dtype)

    def __repr__(self) -> str:
        n, d_in, d_sae = self.W_enc.shape
        kind = "JumpReLU" if self.threshold is not None else "ReLU"
        return f"CrossLayerTranscoder({kind}, {n} layers, d_in={d_in}, d_sae={d_sae})"


def load_circuit_tracer_clt(
    folder: str | Path,
    feature_input_hook: str = "ln2.hook_normalized",
    feature_output_hook: str = "hook_mlp_out",
    dtype: torch.dtype = torch.float32,
) -> CrossLayerTranscoder:
    """A circuit-tracer CLT folder (``W_enc_{l}`` / ``W_dec_{l}`` safetensors per layer).

    Args:
        folder: the folder with ``W_enc_0.safetensors`` .. and ``W_dec_0.safetensors`` ...
        feature_input_hook: block-relative hook the encoders read.
        feature_output_hook: block-relative hook the decoders write.
        dtype: the weights' dtype here.
    """
    folder = Path(folder)
    layers = sorted(int(p.stem.split("_")[-1]) for p in folder.glob("W_enc_*.safetensors"))
    if not layers or layers != list(range(len(layers))):
        raise DePassInputError(
            f"{folder}: expected W_enc_0.safetensors .. W_enc_<n-1>.safetensors (circuit-tracer's "
            f"CLT layout), found layers {layers}"
        )
    enc, dec, b_enc, b_dec, thresholds = [], [], [], [], []
    for layer in layers:
        f = load_file(str(folder / f"W_enc_{layer}.safetensors"))
        decoder_file = folder / f"W_dec_{layer}.safetensors"
        if not decoder_file.exists():
            raise DePassInputError(f"{folder}: W_dec_{layer}.safetensors is missing")
        enc.append(f[f"W_enc_{layer}"].to(dtype).T)  # [d_model, d_sae]
        b_enc.append(f[f"b_enc_{layer}"].to(dtype))
        b_dec.append(f[f"b_dec_{layer}"].to(dtype))
        if f"threshold_{layer}" in f:
            thresholds.append(f[f"threshold_{layer}"].to(dtype))
        dec.append(load_file(str(decoder_file))[f"W_dec_{layer}"].to(dtype))
    if thresholds and len(thresholds) != len(layers):
        raise DePassInputError(f"{folder}: some layers have a JumpReLU threshold and some do not")
    return CrossLayerTranscoder(
        torch.stack(enc),
        torch.stack(b_enc),
        dec,
        torch.stack(b_dec),
        torch.stack(thresholds) if thresholds else None,
        hook_in="blocks.{layer}." + feature_input_hook,
        hook_out="blocks.{layer}." + feature_output_hook,
    )


__all__ = ["CrossLayerTranscoder", "load_circuit_tracer_clt"]
