"""DePass as evaluation methods: thin wrappers with the registry signatures.

The engine is imported when a method runs, not when this module is imported. Registered under
``depass-<rule>`` at every level (patterns frozen, as published), ``depass-taylor-pattern`` and
``depass-taylor-symmetric`` (the attention splits that also credit the QK circuit, see
``depass_lens.qk.AttentionSplit``), plus ``depass-taylor-abs`` (token shares by magnitude) and
``depass-taylor-relative`` for components (the share minus the mean share on the corrupted or
reference prompts, see ``agreement.baseline_relative``), without replacing methods of the same name
registered earlier.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.agreement import baseline_relative
from depass_lens.evaluation.levels import resolve_level
from depass_lens.evaluation.metrics import AnswerMetric, Metric
from depass_lens.evaluation.registry import (
    ComponentMethod,
    ComponentTask,
    SubspaceMethod,
    SubspaceTask,
    TokenMethod,
    TokenTask,
    component_method,
    register_component_method,
    register_subspace_method,
    register_token_method,
    subspace_method,
    token_method,
)

RULES = ("taylor", "softmax", "max", "relu", "linear")
#: Attention splits evaluated besides the published one (``value``), with the linear rule.
ATTENTION_SIDES = ("pattern", "symmetric")


def method_name(rule: str, attention: str = "value") -> str:
    """``depass-<rule>`` or ``depass-<rule>-<attention>`` for a non-default attention split."""
    return f"depass-{rule}" if attention == "value" else f"depass-{rule}-{attention}"


def _engine() -> Any:
    import depass_lens as dp  # noqa: PLC0415

    return dp


def _attribute(engine: Any, *args: Any, **kwargs: Any) -> Any:
    """``engine.attribute`` with autograd on (its adjoint mode needs it even under no_grad)."""
    with torch.enable_grad():
        return engine.attribute(*args, **kwargs)


def _token_shares(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    target: Any,
    rule: str,
    attention: str,
    attention_mask: Tensor | None,
) -> Float[Tensor, "batch pos"]:
    """Each input token's share of ``target`` (DePass from the input embeddings)."""
    dp = _engine()
    engine = dp.DePass(model, rule=rule, attention=attention, progress=False)
    attribution = _attribute(engine, tokens, target, dp.Tokens(), attention_mask=attention_mask)
    return attribution.tokens()[:, 0]


def depass_target(metric: Metric) -> Any:
    """The engine target for a logit or logit-difference :class:`AnswerMetric`."""
    dp = _engine()
    if not isinstance(metric, AnswerMetric) or metric.kind == "prob":
        raise ValueError("DePass methods explain a logit or logit-difference AnswerMetric")
    if metric.kind == "logit":
        return dp.Logit(metric.answer_ids, pos=metric.pos)
    return dp.LogitDiff(metric.answer_ids, metric.wrong_ids, pos=metric.pos)


def depass_token_method(rule: str = "taylor", attention: str = "value") -> TokenMethod:
    """Token shares of the metric (DePass from the input embeddings)."""

    def method(task: TokenTask) -> Float[Tensor, "batch pos"]:
        target = depass_target(task.metric)
        return _token_shares(task.model, task.tokens, target, rule, attention, task.attention_mask)

    name = method_name(rule, attention).replace("-", "_")
    method.__name__ = method.__qualname__ = f"{name}_tokens"
    return token_method(method)


def depass_token_magnitude(rule: str = "taylor") -> TokenMethod:
    """|token share|: ranks tokens that matter either way (for the masking protocols)."""
    shares = depass_token_method(rule)

    def method(task: TokenTask) -> Float[Tensor, "batch pos"]:
        mask = task.attention_mask
        return shares(task.model, task.tokens, task.metric, attention_mask=mask).abs()

    method.__name__ = method.__qualname__ = f"depass_{rule}_abs_tokens"
    return token_method(method)


def depass_component_method(
    rule: str = "taylor", relative: bool = False, attention: str = "value"
) -> ComponentMethod:
    """Head or neuron shares of the metric, layer-major (``relative``: minus reference mean)."""

    def method(task: ComponentTask) -> Float[Tensor, "batch n_comp"]:
        dp = _engine()
        tokens, attention_mask = task.tokens, task.attention_mask
        spec = resolve_level(task.model, task.level)
        engine = dp.DePass(task.model, rule=rule, attention=attention, progress=False)
        target = depass_target(task.metric)
        if spec.kind == "heads":
            source = dp.Heads()
        else:
            source = dp.Neurons(layer=list(spec.layers))

        def shares(toks: Tensor, mask: Tensor | None = None) -> Tensor:
            attribution = _attribute(engine, toks, target, source, attention_mask=mask)
            if spec.kind == "heads":
                scores = attribution.heads()[:, 0].flatten(1)
            else:
                scores = attribution.neurons()[:, 0]
            if scores.shape[-1] != spec.n_comp:
                raise ValueError(f"DePass gave {scores.shape[-1]} scores for {spec.n_comp}")
            return scores

        if not relative:
            return shares(tokens, attention_mask)
        if task.corrupted_tokens is not None:
            corrupted = task.corrupted_tokens
            return baseline_relative(lambda t: shares(t, attention_mask), tokens, corrupted)
        if task.reference_tokens is None:
            raise ValueError("baseline-relative DePass needs corrupted or reference prompts")
        reference = shares(task.reference_tokens).mean(0, keepdim=True)
        return shares(tokens, attention_mask) - reference

    name = method_name(rule, attention).replace("-", "_")
    method.__name__ = method.__qualname__ = f"{name}{'_relative' if relative else ''}_components"
    return component_method(method)


def depass_subspace_method(rule: str = "taylor", attention: str = "value") -> SubspaceMethod:
    """Token shares of a probe reading (a ``Direction`` target at the probe's hook)."""

    def method(task: SubspaceTask) -> Float[Tensor, "batch pos"]:
        probe = task.probe
        if probe.pos == "all":
            raise ValueError("DePass subspace method reads one position, not 'all'")
        dp = _engine()
        target = dp.Direction(probe.direction, pos=probe.pos, hook=probe.hook, name="probe")
        mask = task.attention_mask
        return _token_shares(task.model, task.tokens, target, rule, attention, mask)

    name = method_name(rule, attention).replace("-", "_")
    method.__name__ = method.__qualname__ = f"{name}_subspace"
    return subspace_method(method)


def register_depass_methods(rules: tuple[str, ...] = RULES) -> None:
    """Register the wrappers (names already taken are left alone)."""
    variants = [(rule, "value") for rule in rules] + [("taylor", s) for s in ATTENTION_SIDES]
    for rule, side in variants:
        name = method_name(rule, side)
        register_token_method(name, depass_token_method(rule, side), overwrite=False)
        register_component_method(
            name, depass_component_method(rule, attention=side), sign=1, overwrite=False
        )
        register_subspace_method(name, depass_subspace_method(rule, side), overwrite=False)
    register_token_method("depass-taylor-abs", depass_token_magnitude(), overwrite=False)
    register_component_method(
        "depass-taylor-relative", depass_component_method("taylor", True), sign=1, overwrite=False
    )
