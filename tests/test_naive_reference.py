"""The engine against a naive DePass written from the formulas (``tests/naive_depass.py``).

Losslessness alone cannot catch a rule that splits the neuron *wrongly* but completely (a softmax
with the wrong temperature is still lossless); this comparison can. Every rule, with and without
chunking, and the reference implementation's conventions, on GPT-2- and LLaMA-style models.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from tests.conftest import make_model, random_tokens
from tests.naive_depass import NODES, naive_reference_depass, naive_token_depass, without_biases

RULES = ["taylor", "softmax", "max", "relu", "linear"]


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_engine_equals_naive(family, rule, chunk_size):
    model = make_model(family, torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1, n_pos=7)
    expected = naive_token_depass(model, tokens, rule)
    engine = dp.DePass(model, rule=rule, chunk_size=chunk_size, attention="value")
    got = engine.run(tokens)["unembed.hook_in"][0]
    assert _gap(got, expected) <= 1e-10


@pytest.mark.parametrize("rule", ["taylor", "softmax"])
@pytest.mark.parametrize("side", ["pattern", "symmetric"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_split_equals_naive(family, side, rule):
    """The QK-aware splits against per-head, per-component loops with their own quadrature."""
    model = make_model(family, torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1, n_pos=7)
    expected = naive_token_depass(model, tokens, rule, attention=side)
    split = dp.AttentionSplit(side, nodes=NODES)
    got = dp.DePass(model, rule=rule, attention=split, chunk_size=3).run(tokens)
    assert _gap(got["unembed.hook_in"][0], expected) <= 1e-10


@pytest.mark.parametrize("rule", ["softmax", "max", "relu", "linear"])
def test_reference_parity_equals_naive(rule):
    """The reference implementation's conventions, on the LLaMA-style model it supports."""
    model = make_model("llama", torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1, n_pos=7)
    expected = naive_token_depass(model, tokens, rule, parity=True)
    parity = dp.DePass(model, rule=dp.ReferenceParity(rule), attention="value")
    got = parity.run(tokens)["unembed.hook_in"][0]
    assert _gap(got, expected) <= 1e-10


#: Each level's source, and where the reference's ``[rest, unit_1, ..., unit_n]`` are among ours.
LEVELS = {
    "heads": (lambda cfg: dp.Heads(0), lambda cfg: [cfg.n_heads, *range(cfg.n_heads)]),
    "attn": (lambda cfg: dp.Modules(0, module="attn"), lambda cfg: [1, 0]),
    "mlp": (lambda cfg: dp.Modules(0, module="mlp"), lambda cfg: [1, 0]),
    "neurons": (lambda cfg: dp.Neurons(0), lambda cfg: [cfg.d_mlp, *range(cfg.d_mlp)]),
}


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("rule", ["softmax", "max"])
def test_reference_parity_levels_equal_naive(rule, level, chunk_size):
    """Head, module and neuron level: the reference's order ``[rest, units]`` and its conventions
    on the first (rest) and last (last unit) component, on a bias-free LLaMA as it supports."""
    model = without_biases(make_model("llama", torch.float64, n_layers=2))
    tokens = random_tokens(model, batch=1, n_pos=7)
    expected = naive_reference_depass(model, tokens, rule, level)
    source, order = (make(model.cfg) for make in LEVELS[level])
    parity = dp.ReferenceParity(rule)
    engine = dp.DePass(model, rule=parity, attention="value", chunk_size=chunk_size)
    got = engine.run(tokens, source=source)["unembed.hook_in"][0]
    assert got[-1].abs().max() == 0  # our bias component: nothing, as the model has no biases
    assert _gap(got[order], expected) <= 1e-10
    plain = dp.DePass(model, rule=rule, attention="value").run(tokens, source=source)
    assert _gap(plain["unembed.hook_in"][0][order], expected) > 1e-3  # the conventions matter


def test_reference_roles():
    """Where the reference's first and last components are: tokens vs. a start with a rest."""
    token = [dp.ComponentLabel("token", 0, pos=p) for p in range(3)] + [dp.ComponentLabel("bias")]
    heads = [dp.ComponentLabel("head", 1, h) for h in range(4)]
    heads += [dp.ComponentLabel("rest", 1), dp.ComponentLabel("bias")]
    assert dp.rules.reference_roles(token) == (0, 3)
    assert dp.rules.reference_roles(heads) == (4, 3)
    bound = dp.ReferenceParity("softmax").bind(heads)
    assert (bound.first, bound.last, bound._bos) == (4, 3, False)
    assert dp.ReferenceParity("softmax").bind(token)._bos
    explicit = dp.ReferenceParity("max", ignore_bos=True, first=0, last=-2).bind(heads)
    assert (explicit.first, explicit.last, explicit._bos) == (0, 4, True)


def test_rules_differ_from_each_other():
    """Guard: the rules really produce different splits (else the comparisons above are weak)."""
    model = make_model("gpt2", torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1, n_pos=7)
    finals = {rule: naive_token_depass(model, tokens, rule) for rule in RULES}
    for a in RULES:
        for b in RULES:
            if a < b:
                assert _gap(finals[a], finals[b]) > 1e-3, (a, b)
