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
from tests.naive_depass import NODES, naive_token_depass

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


def test_rules_differ_from_each_other():
    """Guard: the rules really produce different splits (else the comparisons above are weak)."""
    model = make_model("gpt2", torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1, n_pos=7)
    finals = {rule: naive_token_depass(model, tokens, rule) for rule in RULES}
    for a in RULES:
        for b in RULES:
            if a < b:
                assert _gap(finals[a], finals[b]) > 1e-3, (a, b)
