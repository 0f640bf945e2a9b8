"""A HookedTransformer's weights loaded into circuit-tracer's ``ReplacementModel``.

circuit-tracer wraps each MLP (``blocks.L.mlp.old_mlp``) and the unembedding
(``unembed.old_unembed``), so TransformerLens's parameter names are renamed on the way in.
Used by the scripts that run circuit-tracer in its own environment
(``scripts/circuit_tracer_fixture.py``, ``benchmarks/feature_graph_scale.py``); it imports
nothing of depass_lens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def replacement_name(name: str) -> str:
    """``name`` (a HookedTransformer parameter) as circuit-tracer's replacement model calls it."""
    parts = name.split(".")
    if parts[0] == "blocks" and parts[2] == "mlp":
        return ".".join([*parts[:3], "old_mlp", *parts[3:]])
    if parts[0] == "unembed":
        return "unembed.old_unembed." + ".".join(parts[1:])
    return name


def load_hooked_weights(model: Any, state: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model``; returns the model's own parameters it left missing (the
    transcoders' are not its to fill) and the names it did not expect: both empty when the
    weights fit."""
    renamed = {replacement_name(name): tensor for name, tensor in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    own = {n for n, _ in model.named_parameters() if not n.startswith("transcoders.")}
    return sorted(own & set(missing)), list(unexpected)
