"""Building a model under whichever TransformerLens generation is installed.

Two entry points, both offline unless a pretrained name is asked for:

- :func:`from_tl_weights`: a model from a TransformerLens 3.x config dict and state dict (the
  format the zoo ships). Under 3.x that is a ``HookedTransformer``; under 4.x a
  ``TransformerBridge.boot_native`` model carrying the same weights, in compatibility mode
  (:mod:`depass_lens.adapters.native_weights` converts the layout).
- :func:`load_pretrained`: ``HookedTransformer.from_pretrained`` under 3.x,
  ``TransformerBridge.boot_transformers`` + compatibility mode under 4.x.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import torch
from torch import Tensor

from depass_lens.adapters.base import TLModel


def tl_generation() -> int:
    """The major version of the installed TransformerLens (3 or 4)."""
    return int(version("transformer-lens").split(".")[0])


def from_tl_weights(
    config: dict[str, Any],
    state: dict[str, Tensor],
    tokenizer: Any = None,
    *,
    default_padding_side: str = "right",
    device: str = "cpu",
) -> TLModel:
    """A model with TransformerLens 3.x ``config`` (``HookedTransformerConfig`` keywords) and
    parameters ``state`` (``HookedTransformer.named_parameters()`` names), in eval mode.

    Raises ``RuntimeError`` naming the parameters that do not fit.
    """
    if tl_generation() >= 4:
        from depass_lens.adapters.native_weights import native_bridge

        return native_bridge(
            config,
            state,
            tokenizer,
            default_padding_side=default_padding_side,
            device=device,
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(
        HookedTransformerConfig(**config),
        tokenizer=tokenizer,
        default_padding_side=default_padding_side,  # type: ignore[arg-type]
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise RuntimeError(f"weights do not fit the model: missing {missing}, extra {unexpected}")
    if torch.device(device) != model.W_E.device:
        model.to(device)
    model.eval()
    return model


def random_model(
    config: dict[str, Any], device: str = "cpu", dtype: torch.dtype | None = None
) -> TLModel:
    """A randomly initialised model with TransformerLens 3.x ``config`` (for benchmarks and
    examples): a ``HookedTransformer`` under 3.x; under 4.x a ``boot_native`` bridge in
    compatibility mode whose attention fires real scores (:func:`repair_native_scores`).
    ``dtype`` (default: the config's, else float32) is the parameters' dtype from the start."""
    fields = {k: v for k, v in config.items() if k != "dtype"}
    dtype = dtype or config.get("dtype") or torch.float32
    if tl_generation() >= 4:
        import transformer_lens.model_bridge.sources.native  # noqa: F401 - attaches boot_native
        from transformer_lens.model_bridge import TransformerBridge

        from depass_lens.adapters.native_scores import repair_native_scores

        bridge = TransformerBridge.boot_native(fields, device=device, dtype=dtype)  # type: ignore[attr-defined]
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
        return repair_native_scores(bridge).eval()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**fields, device=device, dtype=dtype)
    return HookedTransformer(cfg).eval()


def load_pretrained(name: str, device: str = "cpu") -> TLModel:
    """A pretrained model by name (downloads unless cached): a ``HookedTransformer`` under
    TransformerLens 3.x, a ``TransformerBridge`` in compatibility mode under 4.x."""
    if tl_generation() >= 4:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(name, device=device)
        bridge.enable_compatibility_mode(disable_warnings=True)
        return bridge
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(name, device=device)


__all__ = ["from_tl_weights", "load_pretrained", "random_model", "tl_generation"]
