"""Circuit graphs in bounded memory give the numbers of the direct computation.

Heads' input gradients are read at their projections (``attn.hook_q``/``hook_k``/``hook_v``)
and pulled back through the input norm when a layer's edges are contracted
(:mod:`depass_lens.circuits.receivers`), instead of being carried on per-head copies of the
stream through the whole pass. Both are the same linear algebra in another association order, so
every score agrees to :data:`~tests.conftest.AGREEMENT` (fp64) on every family, in every mode.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.adapters import make_adapter
from depass_lens.circuits import build
from depass_lens.circuits.spec import GraphNodes, build_spec
from depass_lens.decomposition import score_mask, unmasked
from depass_lens.errors import UnsupportedModelError
from depass_lens.evaluation import circuit_baselines
from depass_lens.evaluation.circuit_baselines import eap_graph
from tests.conftest import AGREEMENT, FAMILIES, graph_model, random_tokens

pytestmark = pytest.mark.numerics

TARGETS = [dp.Logit(3), dp.LogitDiff(5, 7, pos=-2)]
MODES = ["value", "symmetric", "difference", "clean", "eap-ig"]
#: Families whose MLPs cannot be split into neuron groups (none, experts, SoLU's norm).
WHOLE_MLPS = ("attn_only", "moe", "solu_ln")


def _graph(model, mode: str, clean, corrupt, nodes):
    if mode == "eap-ig":
        adapter = make_adapter(model)
        spec = build_spec(adapter, GraphNodes(), clean.shape[1], "unembed.hook_in")
        return eap_graph(adapter, spec, clean, corrupt, TARGETS, ["a", "b"], steps=2)
    if mode in ("value", "symmetric"):
        return dp.DePass(model, attention=mode).graph(clean, TARGETS, nodes=nodes)
    return dp.DePass(model).graph(clean, TARGETS, contrast=corrupt, linearisation=mode, nodes=nodes)


def _copies(monkeypatch) -> None:
    """Force the per-head copies of the stream (TransformerLens's split qkv inputs)."""
    for module in (build, circuit_baselines):
        monkeypatch.setattr(module, "projects_heads", lambda *args, **kwargs: False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_projected_heads_equal_per_head_copies(family, mode, monkeypatch):
    model = graph_model(family, torch.float64)
    if family not in WHOLE_MLPS and mode != "eap-ig":
        nodes = GraphNodes(neurons={0: [[0, 1, 2], [5]]})
    else:
        nodes = GraphNodes()
    clean = random_tokens(model, batch=2, n_pos=7, seed=1)
    corrupt = random_tokens(model, batch=2, n_pos=7, seed=2)
    try:
        projected = _graph(model, mode, clean, corrupt, nodes)
    except UnsupportedModelError as error:  # e.g. no secant through a mixture of experts
        pytest.skip(f"{family} refuses {mode}: {error}")
    with monkeypatch.context() as patch:
        _copies(patch)
        copied = _graph(model, mode, clean, corrupt, nodes)
    scale = max(float(copied.node_scores.abs().amax()), float(copied.edge_scores.abs().amax()))
    for name in ("edge_scores", "node_scores", "node_inputs", "own_bias"):
        got, want = getattr(projected, name), getattr(copied, name)
        error = float((got - want).abs().amax()) / scale
        assert error <= AGREEMENT[torch.float64], (name, error)
    assert float(projected.edge_scores.abs().amax()) > 0


@pytest.mark.parametrize("mode", ["symmetric", "difference", "clean"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "neox"])
def test_a_small_memory_budget_gives_the_same_graph(family, mode):
    """A budget of one byte forms the senders' outputs one layer at a time (the chunked
    contraction); every score, token-resolved ones included, equals the one-chunk graph's."""
    model = graph_model(family, torch.float64)
    nodes = GraphNodes(neurons={1: [[0, 1, 2], [5]]})
    clean = random_tokens(model, batch=2, n_pos=7, seed=1)
    corrupt = random_tokens(model, batch=2, n_pos=7, seed=2)
    adapter = make_adapter(model)
    spec = build_spec(adapter, nodes, clean.shape[1], "unembed.hook_in")
    assert len(build.sender_chunks(adapter, spec, clean.shape, 1)) == model.cfg.n_layers + 1
    graphs = []
    for budget in (1, 2**40):
        depass = dp.DePass(model, memory_budget=budget)
        options = dict(nodes=nodes, by_position=True)
        try:
            if mode == "symmetric":
                graphs.append(depass.graph(clean, TARGETS, attention=mode, **options))
            else:
                graphs.append(
                    depass.graph(clean, TARGETS, contrast=corrupt, linearisation=mode, **options)
                )
        except UnsupportedModelError as error:  # a bridge's rotary attention: no secant
            pytest.skip(f"{family} refuses {mode}: {error}")
    chunked, whole = graphs
    scale = float(whole.node_scores.abs().amax())
    for name in ("edge_scores", "edge_scores_by_pos", "node_scores", "node_inputs", "own_bias"):
        error = float((getattr(chunked, name) - getattr(whole, name)).abs().amax()) / scale
        assert error <= AGREEMENT[torch.float64], (name, error)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_released_reference_activations_give_the_same_graph(family, monkeypatch):
    """The difference linearisation drops the corrupted run's queries, keys, values and MLP
    internals layer by layer once read (the pass never holds all of them): every score equals
    the graph built with all of them kept, and none is left in the run's activations."""
    model = graph_model(family, torch.float64)
    clean = random_tokens(model, batch=2, n_pos=7, seed=1)
    corrupt = random_tokens(model, batch=2, n_pos=7, seed=2)
    released: list[tuple[set[str], dict]] = []
    secant_only = build.secant_only

    def spy(adapter, spec, targets, activations):
        names = secant_only(adapter, spec, targets, activations)
        released.append((names, activations))
        return names

    monkeypatch.setattr(build, "secant_only", spy)
    lean = dp.DePass(model).graph(clean, TARGETS, contrast=corrupt)
    names, activations = released[0]
    assert any(n.endswith("mlp.hook_pre") for n in names) and any(
        ".attn.hook_v" in n for n in names
    )
    assert not names & set(activations)
    monkeypatch.setattr(build, "secant_only", lambda *args: set())
    kept = dp.DePass(model).graph(clean, TARGETS, contrast=corrupt)
    scale = float(kept.node_scores.abs().amax())
    for name in ("edge_scores", "node_scores", "node_inputs", "own_bias"):
        error = float((getattr(lean, name) - getattr(kept, name)).abs().amax()) / scale
        assert error <= AGREEMENT[torch.float64], (name, error)


def test_score_masks_shared_by_every_head_are_kept_once():
    """A causal (or padding) mask is the same for every head: one head's copy is kept and
    broadcast. A mask that differs between heads is kept whole."""
    scores = torch.randn(2, 3, 4, 4)
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(causal, -torch.inf)
    mask = score_mask(scores)
    assert mask.shape == (2, 1, 4, 4)
    assert torch.equal(mask.expand_as(scores), unmasked(scores))
    scores[1, 2, 3, 0] = torch.finfo(scores.dtype).min  # a Hugging Face mask on one head only
    mask = score_mask(scores)
    assert mask.shape == scores.shape and not bool(mask[1, 2, 3, 0]) and bool(mask[1, 1, 3, 0])
