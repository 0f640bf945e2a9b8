"""Adjoint mode scores the constants by their own gradients, so completeness is a real check.

The bias component's score is the sum, over every constant the frozen-linearised model adds after
the start point, of ``<constant, gradient where it enters>`` (plus the target's own constant).
Summed with the components' ``<gradient, component>`` it must give the real target value; these
tests show that it does on every family and split, and that it stops doing so when one path or
one constant is removed on purpose.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens import constants
from tests.conftest import FAMILIES, make_model, random_tokens

SOURCES = {"tokens": dp.Tokens(), "heads": dp.Heads(), "modules": dp.Modules()}


def _splits(family: str) -> list[str]:
    return ["value"] if family == "moe" else ["value", "symmetric"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adjoint_completeness_with_directly_scored_constants(family):
    """fp64: scores + directly computed bias == target value to 1e-10, every split and source."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model)
    for split in _splits(family):
        depass = dp.DePass(model, attention=split)
        for name, source in SOURCES.items():
            attribution = depass.attribute(tokens, dp.LogitDiff(3, 8), source, mode="adjoint")
            assert attribution.completeness_error() <= 1e-10, (split, name)


def test_bias_matches_forward_mode_bias():
    """The bias entry itself (not only the total) equals forward mode's explicit bias component."""
    model = make_model("gemma", torch.float64)
    tokens = random_tokens(model)
    depass = dp.DePass(model, attention="symmetric")
    for source in SOURCES.values():
        adjoint = depass.attribute(tokens, dp.Logit(5), source, mode="adjoint")
        forward = depass.attribute(tokens, dp.Logit(5), source, mode="forward")
        torch.testing.assert_close(adjoint.bias, forward.bias, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("family", "split", "dropped"),
    [
        ("gpt2", "value", "attn.b_V"),
        ("gpt2", "value", "attn.b_O"),
        ("gpt2", "value", "mlp.b_out"),
        ("llama", "value", "hook_post.remainder"),  # a gated MLP's b_in lives in the remainder
        ("gpt2", "symmetric", "pattern_constants"),  # quadrature remainder, Q/K biases
        ("alibi_local", "pattern", "pattern_constants"),  # the same with ALiBi and a window
    ],
)
def test_dropping_one_constant_breaks_completeness(monkeypatch, family, split, dropped):
    """Remove one kind of constant site on purpose: completeness must fail visibly."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model)
    add = constants.ConstantLedger.add

    def without(self, site):
        if not site.name.endswith(dropped):
            add(self, site)

    monkeypatch.setattr(constants.ConstantLedger, "add", without)
    attribution = dp.DePass(model, attention=split).attribute(
        tokens, dp.Logit(3), dp.Tokens(), mode="adjoint"
    )
    assert attribution.completeness_error() > 1e-4, dropped


@pytest.mark.parametrize("hook", ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"])
def test_dropping_one_gradient_path_breaks_completeness(monkeypatch, hook):
    """Cut one sublayer out of the backward pass (as if a path were missed): completeness fails."""
    from depass_lens.adjoint import Linearisation

    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    hooks = Linearisation.hooks

    def with_cut(self):
        return [*hooks(self), (hook, lambda value, hook: value.detach())]

    monkeypatch.setattr(Linearisation, "hooks", with_cut)
    attribution = dp.DePass(model).attribute(tokens, dp.Logit(3), dp.Tokens(), mode="adjoint")
    assert attribution.completeness_error() > 1e-4
