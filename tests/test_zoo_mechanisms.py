"""The documented zoo mechanisms hold for the shipped weights, re-measured by path patching.

Every edge of ``zoo.mechanism(name)`` is patched again with plain TransformerLens hooks, on the
prompts and counterfactual it was documented with: the effect must keep its sign and at least half
its documented size, and the documented size must be substantial. So neither the mechanism table
nor the card's numbers can silently go stale.
"""

from __future__ import annotations

import pytest
import torch

from depass_lens import zoo
from depass_lens.zoo.mechanisms import MECHANISMS, Mechanism
from depass_lens.zoo.paths import PathPatcher, bundles, counterfactual_tasks

#: Documented edges must move the metric by at least this share of the counterfactual's effect.
SUBSTANTIAL = 0.03
#: Prompts re-measured per model: the first of the documented 200, which keeps the test fast.
N_PROMPTS = 100


@pytest.fixture(autouse=True)
def one_thread():
    """Many small forward passes: one thread is several times faster on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_mechanism_edges_hold_by_path_patching(name):
    model = zoo.load(name)
    mechanism = zoo.mechanism(name)
    measured = zoo.path_effects(name)
    documented = {tuple(row["edge"]): row for row in measured["edges"]}
    assert set(documented) == set(mechanism.edges), "paths json and MECHANISMS disagree"

    n = N_PROMPTS  # the first prompts of the documented batch (same seed), to keep this fast
    variants = counterfactual_tasks(zoo.task(name))
    clean = variants["corrupted"].batch(model, n, split="test", seed=11)
    patchers: dict[str, PathPatcher] = {}
    for edge in mechanism.edges:
        row = documented[edge]
        label = row["counterfactual"]
        if label not in patchers:
            batch = variants[label].batch(model, n, split="test", seed=11)
            assert torch.equal(batch.tokens, clean.tokens)
            patchers[label] = PathPatcher(
                model, clean.tokens, batch.corrupted, clean.answers, clean.wrong
            )
        assert abs(row["fraction"]) >= SUBSTANTIAL, (edge, row)
        effect = patchers[label].effect(edge)
        assert effect * row["effect"] > 0, (edge, effect, row)
        assert abs(effect) >= 0.5 * abs(row["effect"]), (edge, effect, row)

    # the edges between two stages, patched together
    groups = bundles(mechanism)
    for row in measured["bundles"]:
        edges = groups[(row["sender"], row["receiver"], row["type"])]
        label = row["counterfactual"]
        if label not in patchers:
            batch = variants[label].batch(model, n, split="test", seed=11)
            patchers[label] = PathPatcher(
                model, clean.tokens, batch.corrupted, clean.answers, clean.wrong
            )
        effect = patchers[label].effect(*edges)
        assert effect * row["effect"] > 0 and abs(effect) >= 0.5 * abs(row["effect"]), row


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_mechanism_names_fit_the_model(name):
    model = zoo.load(name)
    mechanism = zoo.mechanism(name)
    heads = {
        f"L{layer}H{h}" for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)
    }
    mlps = (
        set() if model.cfg.attn_only else {f"L{layer}.mlp" for layer in range(model.cfg.n_layers)}
    )
    for _, members in mechanism.stages:
        assert members and set(members) <= heads | mlps
    for sender, receiver, _ in mechanism.edges:
        assert sender in heads | mlps | {"embed"}
        assert receiver in heads | mlps | {"logits"}
    assert "## Mechanism" in zoo.card(name)


def test_binding_mechanism_has_three_composing_stages():
    """Stage 1 feeds stage 2, stage 2 feeds stage 3, stage 3 feeds the logits: head to head, and
    each of these links, patched as a whole, carries most of its counterfactual's effect."""
    mechanism = zoo.mechanism("binding")
    names = [name for name, _ in mechanism.stages]
    joint = {
        (row["sender"], row["receiver"]): row for row in zoo.path_effects("binding")["bundles"]
    }
    for sender, receiver in zip(names, [*names[1:], "logits"]):
        assert abs(joint[(sender, receiver)]["fraction"]) > 0.5, (sender, receiver)
    assert len(mechanism.stages) >= 3
    stage_of = {head: i for i, (_, heads) in enumerate(mechanism.stages) for head in heads}
    links = {
        (stage_of[s], stage_of.get(r, len(mechanism.stages)))
        for s, r, _ in mechanism.edges
        if s in stage_of and (r in stage_of or r == "logits")
    }
    for i in range(len(mechanism.stages)):
        assert (i, i + 1) in links, (i, links)


def test_mechanism_rejects_bad_edges():
    with pytest.raises(ValueError):
        Mechanism(stages=(), edges=(("L0H0", "L1H0", "x"),), notes="")
    with pytest.raises(ValueError):
        Mechanism(stages=(), edges=(("L0H0", "logits", "v"),), notes="")
    with pytest.raises(KeyError):
        zoo.mechanism("no-such-model")
