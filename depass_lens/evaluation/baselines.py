"""The baselines of the paper's comparisons, registered under their report names.

Token level (``token_baselines``): ``attention``, ``attention-rollout``, ``gradient-norm``,
``grad-x-input``, ``integrated-gradients``, ``random``, ``occlusion`` (leave-one-out masking,
the exhaustive ground truth). Component level
(``component_baselines``): ``attribution-patching``, ``grad-x-activation``, ``activation-norm``,
``random``, ``ablation-zero``, ``ablation-mean`` (exact, one component at a time) and
``activation-patching`` (exact patching from the corrupted prompts). Subspace level
(``subspace``): gradient methods of the probe reading, ``attention``, ``random``.

See ``registry`` for the signatures; add methods with ``register_*_method``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from depass_lens.evaluation.component_baselines import (
    activation_norm,
    attribution_patching,
    exact_ablation,
    gradient_x_activation,
    random_components,
)
from depass_lens.evaluation.registry import (
    COMPONENT_METHODS,
    COMPONENT_SIGNS,
    SUBSPACE_METHODS,
    TOKEN_METHODS,
    component_sign,
    register_component_method,
    register_subspace_method,
    register_token_method,
)
from depass_lens.evaluation.subspace import (
    probe_attention,
    probe_gradient_norm,
    probe_gradient_x_input,
    probe_integrated_gradients,
    probe_random,
)
from depass_lens.evaluation.token_baselines import (
    attention_rollout,
    attention_weights,
    gradient_norm,
    gradient_x_input,
    integrated_gradients,
    occlusion,
    random_tokens,
)

__all__ = [
    "COMPONENT_METHODS",
    "COMPONENT_SIGNS",
    "SUBSPACE_METHODS",
    "TOKEN_METHODS",
    "activation_norm",
    "attention_rollout",
    "attention_weights",
    "attribution_patching",
    "component_sign",
    "exact_ablation",
    "gradient_norm",
    "gradient_x_activation",
    "gradient_x_input",
    "integrated_gradients",
    "occlusion",
    "random_components",
    "random_tokens",
    "register_component_method",
    "register_subspace_method",
    "register_token_method",
]

_fn: Any
for _name, _fn in {
    "attention": attention_weights,
    "attention-rollout": attention_rollout,
    "gradient-norm": gradient_norm,
    "grad-x-input": gradient_x_input,
    "integrated-gradients": integrated_gradients,
    "random": random_tokens,
    "occlusion": occlusion,
}.items():
    register_token_method(_name, _fn, overwrite=False)

for _name, _fn, _sign in [
    ("attribution-patching", attribution_patching, -1),
    ("grad-x-activation", gradient_x_activation, 1),
    ("activation-norm", activation_norm, 1),
    ("random", random_components, 1),
    ("ablation-zero", partial(exact_ablation, ablation="zero"), -1),
    ("ablation-mean", partial(exact_ablation, ablation="mean"), -1),
    ("activation-patching", partial(exact_ablation, ablation="patch"), -1),
]:
    register_component_method(_name, _fn, sign=_sign, overwrite=False)

for _name, _fn in {
    "gradient-norm": probe_gradient_norm,
    "grad-x-input": probe_gradient_x_input,
    "integrated-gradients": probe_integrated_gradients,
    "attention": probe_attention,
    "random": probe_random,
}.items():
    register_subspace_method(_name, _fn, overwrite=False)
