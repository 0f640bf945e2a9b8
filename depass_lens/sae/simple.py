"""A small, dependency-free SAE that reads and writes SAELens's on-disk format.

``cfg.json`` + ``sae_weights.safetensors`` (keys ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec
[d_sae, d_out]``, ``b_dec [d_out]``, and ``threshold`` for JumpReLU) are what SAELens 6 writes, so a
directory saved here loads with ``sae_lens.SAE.load_from_disk`` and the other way round. It
supports the ``standard`` (ReLU), ``jumprelu`` and ``topk`` architectures; it exists so the zoo's
SAEs and the tests need no SAELens.

A transcoder is the same object with ``hook_name_out`` (where its output is compared, e.g. the
MLP's ``hook_mlp_out`` for an encoder reading ``ln2.hook_normalized``), ``d_out`` and no ``b_dec``
subtracted from the input. It is written as SAELens writes its transcoders: ``d_out`` at the top
of ``cfg.json``, ``metadata.hook_name_out``, architecture ``transcoder`` (ReLU) or
``jumprelu_transcoder``. SAELens has no TopK transcoder class, so a TopK transcoder keeps
architecture ``topk``: with ``d_out == d_in`` SAELens loads it as a ``TopKSAE`` with the same
encoder and decoder, and its ``HookedSAETransformer`` reads ``metadata.hook_name_out`` as the
output hook.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from depass_lens.errors import DePassInputError

ARCHITECTURES = ("standard", "jumprelu", "topk")
#: SAELens's architecture names for transcoders -> ours (a TopK transcoder stays ``topk``)
_TRANSCODER_ARCHITECTURES = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu"}
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"


class SimpleSAE(nn.Module):
    """``acts = act((x - b_dec) @ W_enc + b_enc)``, ``x_hat = acts @ W_dec + b_dec``.

    Args:
        d_in: input width.
        d_sae: number of latents.
        hook_name: the TransformerLens hook it reads (``cfg.metadata.hook_name``, as in SAELens).
        architecture: ``"standard"`` (ReLU), ``"jumprelu"`` (``threshold`` per latent) or
            ``"topk"`` (``k`` largest pre-activations, ReLU'd).
        k: for ``topk``.
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (default: SAELens's, on for an
            SAE; a transcoder must not).
        hook_name_out: a transcoder's output hook (``cfg.metadata.hook_name_out``, as in SAELens);
            ``None`` for an SAE, which reconstructs its own input.
        d_out: the decoder's width (default ``d_in``).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hook_name: str,
        architecture: str = "standard",
        *,
        k: int | None = None,
        apply_b_dec_to_input: bool | None = None,
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        hook_name_out: str | None = None,
        d_out: int | None = None,
    ):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = hook_name_out is None
        if apply_b_dec_to_input and (hook_name_out is not None or d_out != d_in):
            raise DePassInputError(
                "SimpleSAE: a transcoder (hook_name_out or d_out != d_in) cannot subtract b_dec "
                "from its input; pass apply_b_dec_to_input=False"
            )
        if architecture not in ARCHITECTURES:
            raise DePassInputError(
                f"SimpleSAE: architecture must be one of {ARCHITECTURES}, not {architecture!r}"
            )
        if architecture == "topk" and not k:
            raise DePassInputError("SimpleSAE: a topk SAE needs k")
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        meta = SimpleNamespace(
            hook_name=hook_name, hook_name_out=hook_name_out, model_name=model_name
        )
        self.cfg = SimpleNamespace(
            d_in=d_in,
            d_sae=d_sae,
            d_out=d_out,
            architecture=architecture,
            k=k,
            apply_b_dec_to_input=apply_b_dec_to_input,
            normalize_activations="none",
            metadata=meta,
        )

    def __repr__(self) -> str:
        c = self.cfg
        if self.is_transcoder:
            return (
                f"SimpleSAE({c.architecture} transcoder, d_in={c.d_in}, d_sae={c.d_sae}, "
                f"d_out={c.d_out}, {c.metadata.hook_name} -> {c.metadata.hook_name_out})"
            )
        return (
            f"SimpleSAE({c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, {c.metadata.hook_name})"
        )

    @property
    def is_transcoder(self) -> bool:
        return self.cfg.metadata.hook_name_out is not None

    def hidden_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        pre = self.hidden_pre(x.to(self.W_enc.dtype))
        arch = self.cfg.architecture
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return self.decode(self.encode(x))

    def config_dict(self) -> dict[str, Any]:
        """SAELens 6's ``cfg.json`` fields (a transcoder's as SAELens's ``TranscoderConfig``)."""
        c = self.cfg
        out: dict[str, Any] = {
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": c.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "hook_z" if c.metadata.hook_name.endswith("hook_z") else "none",
            "metadata": {
                "sae_lens_version": "6.0.0",
                "sae_lens_training_version": "6.0.0",
                "hook_name": c.metadata.hook_name,
                "model_name": c.metadata.model_name,
            },
            "architecture": c.architecture,
        }
        if c.architecture == "topk":
            out["k"] = c.k
        if self.is_transcoder:
            out["d_out"] = c.d_out
            out["metadata"]["hook_name_out"] = c.metadata.hook_name_out
            names = {ours: theirs for theirs, ours in _TRANSCODER_ARCHITECTURES.items()}
            out["architecture"] = names.get(c.architecture, c.architecture)
        return out


def save_sae_dir(sae: SimpleSAE, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens's layout) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().contiguous().cpu() for n, p in sae.named_parameters()}
    save_file(weights, str(path / WEIGHTS_FILE))
    cfg = sae.config_dict()
    if extra:
        cfg["metadata"].update(extra)
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=1))
    return path


def load_sae_dir(path: str | Path, device: str = "cpu") -> SimpleSAE:
    """Load a SAELens-format directory (standard, jumprelu or topk; transcoders of these) as a
    :class:`SimpleSAE`."""
    path = Path(path)
    if not (path / CFG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} has no {CFG_FILE} and {WEIGHTS_FILE} (SAELens's format)")
    cfg = json.loads((path / CFG_FILE).read_text())
    meta = cfg.get("metadata", {})
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if cfg.get("normalize_activations", "none") != "none":
        raise DePassInputError(
            f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported "
            "here; load it with SAELens"
        )
    weights = load_file(str(path / WEIGHTS_FILE), device=device)
    architecture = cfg.get("architecture", "standard")
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
    sae = SimpleSAE(
        cfg["d_in"],
        cfg["d_sae"],
        hook,
        _TRANSCODER_ARCHITECTURES.get(architecture, architecture),
        k=cfg.get("k"),
        apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", hook_out is None),
        model_name=meta.get("model_name"),
        dtype=weights["W_enc"].dtype,
        hook_name_out=hook_out,
        d_out=cfg.get("d_out", cfg["d_in"]),
    )
    sae.load_state_dict(weights)
    skip = ("hook_name", "hook_name_out")
    sae.cfg.metadata.extra = {k: v for k, v in meta.items() if k not in skip}
    return sae.to(device).eval()


__all__ = ["SimpleSAE", "load_sae_dir", "save_sae_dir"]
