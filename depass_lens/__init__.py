"""depass_lens: DePass (Decomposed Forward Pass) attribution as a TransformerLens plugin.

>>> import depass_lens as dp
>>> dp_model = dp.DePass(model)                          # wraps a HookedTransformer
>>> res = dp_model.run(prompt, source=dp.Tokens())       # decomposed stream at every hook
>>> scores = dp_model.attribute(prompt, dp.LogitDiff(" Mary", " John"), source=dp.Heads())
>>> graph = dp_model.graph(prompts, dp.LogitDiff(" Mary", " John"), contrast=corrupted)  # edges

Every public name is imported on first use (PEP 562), so ``import depass_lens`` and the
``depass-lens`` command line start without loading torch, TransformerLens or plotly.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["BIAS", "ComponentLabel", "Decomposition"], "decomposition"),
    "DePass": "depass",
    **dict.fromkeys(
        [
            "CacheMismatchError",
            "DePassError",
            "DePassInputError",
            "LosslessnessError",
            "UnsupportedModelError",
        ],
        "errors",
    ),
    "Generation": "generation",
    "AttentionSplit": "qk",
    **dict.fromkeys(["Attribution", "DecomposedCache"], "results"),
    **dict.fromkeys(
        [
            "LinearRule",
            "MaxRule",
            "MLPRule",
            "ReferenceParity",
            "ReluRule",
            "SoftmaxRule",
            "TaylorRule",
            "get_rule",
        ],
        "rules",
    ),
    **dict.fromkeys(["SAELatent", "SAELatents"], "sae"),
    **dict.fromkeys(
        ["Combined", "Custom", "Heads", "Modules", "Neurons", "Source", "Subspace", "Tokens"],
        "sources",
    ),
    **dict.fromkeys(
        [
            "AttentionScore",
            "CenteredLogit",
            "Direction",
            "HiddenState",
            "Logit",
            "LogitDiff",
            "Target",
        ],
        "targets",
    ),
    "FeatureGraph": "features",
}

if TYPE_CHECKING:  # the same names, for type checkers and documentation tools
    from depass_lens import circuits, evaluation, plot, zoo  # noqa: F401
    from depass_lens.decomposition import BIAS, ComponentLabel, Decomposition
    from depass_lens.depass import DePass
    from depass_lens.errors import (
        CacheMismatchError,
        DePassError,
        DePassInputError,
        LosslessnessError,
        UnsupportedModelError,
    )
    from depass_lens.features import FeatureGraph
    from depass_lens.generation import Generation
    from depass_lens.qk import AttentionSplit
    from depass_lens.results import Attribution, DecomposedCache
    from depass_lens.rules import (
        LinearRule,
        MaxRule,
        MLPRule,
        ReferenceParity,
        ReluRule,
        SoftmaxRule,
        TaylorRule,
        get_rule,
    )
    from depass_lens.sae import SAELatent, SAELatents
    from depass_lens.sources import (
        Combined,
        Custom,
        Heads,
        Modules,
        Neurons,
        Source,
        Subspace,
        Tokens,
    )
    from depass_lens.targets import (
        AttentionScore,
        CenteredLogit,
        Direction,
        HiddenState,
        Logit,
        LogitDiff,
        Target,
    )


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``dp.zoo``, ``dp.plot``, ...), on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"depass_lens.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"depass_lens.{name}") is not None:
        return importlib.import_module(f"depass_lens.{name}")
    raise AttributeError(f"module 'depass_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "circuits", "evaluation", "features", "zoo"})


__all__ = [
    "BIAS",
    "AttentionScore",
    "AttentionSplit",
    "Attribution",
    "CenteredLogit",
    "Combined",
    "Generation",
    "CacheMismatchError",
    "ComponentLabel",
    "Custom",
    "DePass",
    "DePassError",
    "DePassInputError",
    "DecomposedCache",
    "Decomposition",
    "Direction",
    "FeatureGraph",
    "Heads",
    "HiddenState",
    "LinearRule",
    "Logit",
    "LogitDiff",
    "LosslessnessError",
    "MLPRule",
    "MaxRule",
    "Modules",
    "Neurons",
    "ReferenceParity",
    "ReluRule",
    "SAELatent",
    "SAELatents",
    "SoftmaxRule",
    "Source",
    "Subspace",
    "TaylorRule",
    "Target",
    "Tokens",
    "UnsupportedModelError",
    "get_rule",
    "plot",
]
