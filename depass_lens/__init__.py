"""depass_lens: DePass (Decomposed Forward Pass) attribution as a TransformerLens plugin.

>>> import depass_lens as dp
>>> dp_model = dp.DePass(model)                          # wraps a HookedTransformer
>>> res = dp_model.run(prompt, source=dp.Tokens())       # decomposed stream at every hook
>>> scores = dp_model.attribute(prompt, dp.LogitDiff(" Mary", " John"), source=dp.Heads())
>>> graph = dp_model.graph(prompts, dp.LogitDiff(" Mary", " John"), contrast=corrupted)  # edges
"""

import importlib
from typing import Any

from depass_lens import plot
from depass_lens.decomposition import BIAS, ComponentLabel, Decomposition
from depass_lens.depass import DePass
from depass_lens.errors import (
    CacheMismatchError,
    DePassError,
    DePassInputError,
    LosslessnessError,
    UnsupportedModelError,
)
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
    Direction,
    HiddenState,
    Logit,
    LogitDiff,
    Target,
)

__version__ = "0.1.0"

_LAZY = {"zoo", "evaluation", "circuits"}  # subpackages, imported on first use


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"depass_lens.{name}")
    raise AttributeError(f"module 'depass_lens' has no attribute {name!r}")


__all__ = [
    "BIAS",
    "AttentionScore",
    "AttentionSplit",
    "Attribution",
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
