"""Model adapters: one per TransformerLens generation, behind one protocol.

:func:`make_adapter` picks the adapter by the model's type: a TransformerLens 3.x
``HookedTransformer`` gets :class:`~depass_lens.adapters.hooked.HookedAdapter`, a 4.x
``TransformerBridge`` gets :class:`~depass_lens.adapters.bridge.BridgeAdapter`. TransformerLens
classes are imported only here, lazily, so ``import depass_lens`` works under either generation.
"""

from __future__ import annotations

from typing import Any

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
    Rotary,
    Stage,
    TLModel,
    as_tensor,
)


def repair_native_scores(bridge: Any) -> Any:
    """See :func:`depass_lens.adapters.native_scores.repair_native_scores`."""
    from depass_lens.adapters.native_scores import repair_native_scores as repair

    return repair(bridge)


def _hooked_transformer_class() -> type | None:
    """TransformerLens 3.x's ``HookedTransformer`` (``None`` under 4.x, which removed it)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def _bridge_class() -> type | None:
    """TransformerLens's ``TransformerBridge`` (``None`` where the installed version has none)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


def make_adapter(model: Any) -> ModelAdapter:
    """The adapter for ``model``: by its type, never by its config.

    Raises ``TypeError`` for anything but a ``HookedTransformer`` or a ``TransformerBridge``.
    """
    hooked = _hooked_transformer_class()
    if hooked is not None and isinstance(model, hooked):
        from depass_lens.adapters.hooked import HookedAdapter

        return HookedAdapter(model)
    bridge = _bridge_class()
    if bridge is not None and isinstance(model, bridge):
        from depass_lens.adapters.bridge import BridgeAdapter

        return BridgeAdapter(model)
    raise TypeError(
        "DePass wraps a TransformerLens model: a transformer_lens.HookedTransformer (3.x) or a "
        f"transformer_lens.model_bridge.TransformerBridge (4.x); got {type(model).__name__}"
    )


def is_model(value: Any) -> bool:
    """Whether ``value`` is a model :func:`make_adapter` accepts."""
    classes = [c for c in (_hooked_transformer_class(), _bridge_class()) if c is not None]
    return any(isinstance(value, c) for c in classes)


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
    "is_model",
    "make_adapter",
    "repair_native_scores",
]
