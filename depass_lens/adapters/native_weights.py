"""TransformerLens 3.x weights on a TransformerLens 4.x ``boot_native`` model (no download).

The zoo ships ``HookedTransformer`` parameters (``blocks.0.attn.W_Q`` ``[head d_model d_head]``,
...). Under TransformerLens 4 the same model is a TL-native transformer inside a
``TransformerBridge``; this module lays the 3.x tensors out in its ``nn.Linear`` slots so the two
compute the same function:

- Q/K/V/O and MLP matrices are transposed/flattened into ``nn.Linear`` weights.
- Rotary: TL 3 rotates the pairs ``(i, i + r/2)`` (GPT-NeoX halves), the native model the adjacent
  pairs ``(2i, 2i+1)`` with the same frequencies. Permuting the rotary dimensions of W_Q, W_K and
  their biases the same way maps one onto the other (scores ``q . k`` do not see the order).
- The native model has no unembedding bias and no biases on gated MLPs; where the 3.x model has
  them, biased ``nn.Linear`` layers replace those slots before the bridge is built. A gated MLP's
  ``b_in`` (added after ``act(gate) * up`` in TL 3) is folded into ``b_out`` through ``W_out``:
  same output, but that bias then reaches the stream as a constant, not through the neurons.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import einops
import torch
from torch import Tensor, nn

from depass_lens.adapters.native_scores import repair_native_scores

#: TransformerLens 3 config keys the native model has no slot for; refused if set.
_UNSUPPORTED = {
    "parallel_attn_mlp": "parallel attention and MLP",
    "use_normalization_before_and_after": "post-norms",
    "num_experts": "mixture of experts",
    "use_local_attn": "local attention",
    "use_qk_norm": "QK norm",
}


def _rotary_permutation(d_head: int, rotary_dim: int) -> Tensor:
    """Indices taking TL 3's halves layout of the rotary dims to the adjacent-pairs layout."""
    half = rotary_dim // 2
    perm = torch.arange(d_head)
    perm[0:rotary_dim:2] = torch.arange(half)
    perm[1:rotary_dim:2] = torch.arange(half, rotary_dim)
    return perm


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``[out, in]`` (and ``bias``)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.to(weight.dtype)


def _bridge_config(config: dict[str, Any], tokenizer: Any, padding_side: str) -> Any:
    from transformer_lens.config import TransformerBridgeConfig

    problems = [text for key, text in _UNSUPPORTED.items() if config.get(key)]
    positional = config.get("positional_embedding_type", "standard")
    if positional not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={positional!r}")
    if config.get("act_fn") == "solu_ln":
        problems.append("act_fn='solu_ln'")
    if problems:
        raise NotImplementedError(
            "TransformerLens 4's native model cannot hold these TransformerLens 3 weights: "
            + ", ".join(problems)
            + ". Load them under transformer-lens 3.x instead."
        )
    fields = dict(config)
    fields.setdefault("default_prepend_bos", True)
    fields["default_padding_side"] = padding_side
    fields["init_weights"] = False
    if tokenizer is not None:
        fields.setdefault("d_vocab", len(tokenizer))
    return TransformerBridgeConfig.from_dict(fields)


def _load(model: Any, cfg: Any, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (TL 3 names) into ``model`` (a ``NativeModel``), replacing bias-less slots."""
    d_head = cfg.d_head
    perm = None
    if cfg.positional_embedding_type == "rotary":
        perm = _rotary_permutation(d_head, cfg.rotary_dim or d_head)

    def qkv(name: str, layer: int, rotate: bool) -> tuple[Tensor, Tensor]:
        prefix = f"blocks.{layer}.attn."
        W = state.get(prefix + f"W_{name}", state.get(prefix + f"_W_{name}"))
        b = state.get(prefix + f"b_{name}", state.get(prefix + f"_b_{name}"))
        if W is None or b is None:
            raise RuntimeError(f"weights lack {prefix}W_{name} / b_{name}")
        if rotate and perm is not None:
            W, b = W[..., perm], b[..., perm]
        return einops.rearrange(W, "h d e -> (h e) d"), einops.rearrange(b, "h e -> (h e)")

    with torch.no_grad():
        model.tok_embed.weight.copy_(state["embed.W_E"])
        if model.pos is not None:
            model.pos.weight.copy_(state["pos_embed.W_pos"])
        for layer, block in enumerate(model.layers):
            for name, slot in (("Q", "q"), ("K", "k"), ("V", "v")):
                W, b = qkv(name, layer, rotate=name != "V")
                setattr(block.attn, slot, _linear(W, b))
            prefix = f"blocks.{layer}."
            W_O = einops.rearrange(state[prefix + "attn.W_O"], "h e d -> d (h e)")
            block.attn.o = _linear(W_O, state[prefix + "attn.b_O"])
            _norm(block.ln1, state, prefix + "ln1")
            if cfg.attn_only:
                continue
            _norm(block.ln2, state, prefix + "ln2")
            W_in, b_in = state[prefix + "mlp.W_in"], state[prefix + "mlp.b_in"]
            W_out, b_out = state[prefix + "mlp.W_out"], state[prefix + "mlp.b_out"]
            if cfg.gated_mlp:
                block.mlp.gate = _linear(state[prefix + "mlp.W_gate"].T, None)
                setattr(block.mlp, "in", _linear(W_in.T, None))
                block.mlp.out = _linear(W_out.T, b_out + b_in @ W_out)
            else:
                block.mlp.fc_in = _linear(W_in.T, b_in)
                block.mlp.fc_out = _linear(W_out.T, b_out)
        _norm(model.ln_out, state, "ln_final")
        model.head = _linear(state["unembed.W_U"].T, state.get("unembed.b_U"))
    for module in model.modules():  # rebuilt slots: keep one dtype and no grad surprises
        module.train(False)


def _norm(module: nn.Module, state: dict[str, Tensor], prefix: str) -> None:
    """Copy a TL 3 norm's ``w`` (and ``b``) into the native norm module."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and prefix + ".w" in state:
        weight.copy_(state[prefix + ".w"])
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and prefix + ".b" in state:
        bias.copy_(state[prefix + ".b"])


@contextmanager
def _probe_allowed(tokenizer: Any) -> Iterator[None]:
    """TransformerLens 4's bridge builder encodes ``"a"`` to learn whether the tokenizer adds
    BOS/EOS; a zoo tokenizer refuses words outside its vocabulary (``_refuse_unknown``), so for
    the build it lets that probe through (the refusal is back on afterwards)."""
    if tokenizer is None or not hasattr(tokenizer, "_refuse_unknown"):
        yield
        return
    tokenizer._refuse_unknown = lambda text: None  # shadows the method on this instance
    try:
        yield
    finally:
        del tokenizer._refuse_unknown


def native_bridge(
    config: dict[str, Any],
    state: dict[str, Tensor],
    tokenizer: Any = None,
    *,
    default_padding_side: str = "right",
    device: str = "cpu",
) -> Any:
    """A ``TransformerBridge`` (compatibility mode, no weight processing) computing what a
    ``HookedTransformer`` with ``config`` and ``state`` computes."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    cfg = _bridge_config(config, tokenizer, default_padding_side)
    dtype = state["embed.W_E"].dtype
    model = NativeModel(cfg).to(dtype)
    _load(model, cfg, state)
    model.to(device)
    with _probe_allowed(tokenizer):
        bridge = build_bridge_from_module(
            model,
            architecture="TransformerLensNative",
            tl_config=cfg,
            tokenizer=tokenizer,
            dtype=dtype,
            model_name=str(config.get("model_name", "native")),
        )
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    repair_native_scores(bridge)
    bridge.eval()
    return bridge


__all__ = ["native_bridge"]
