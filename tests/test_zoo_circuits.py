"""Circuit graphs recover the zoo models' known mechanisms (established by path patching).

Each mechanism in ``zoo.mechanism(name)`` was measured with plain TransformerLens hooks
(``tests/test_zoo_mechanisms.py`` re-measures it); here the graphs, computed from one forward and
one backward pass, must find it without being told where to look.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens import zoo

INDUCTION_HEADS = ["L1H0", "L1H1", "L1H2", "L1H3"]


def _batch(name: str, n: int = 48):
    model = zoo.load(name)
    batch = zoo.task(name).batch(model, n, split="test", seed=31)
    return model, batch, dp.LogitDiff(batch.answers, batch.wrong)


def _head_to_head(graph, k: int) -> list[tuple[str, str, str]]:
    """The ``k`` strongest edges from one head to another (|batch-mean score|)."""
    rows = [r for r in graph.edge_table() if r["sender"][0] == "L" and r["receiver"][0] == "L"]
    rows = [
        r for r in rows if "mlp" not in r["sender"] + r["receiver"] and ".b_" not in r["sender"]
    ]
    rows.sort(key=lambda r: -abs(r["score"]))
    return [(r["sender"], r["receiver"], r["type"]) for r in rows[:k]]


@pytest.mark.parametrize("attention", ["pattern", "symmetric"])
def test_induction_key_edges_from_the_previous_token_head(attention):
    """L0H1 (previous-token head) feeds every induction head through its key: with a QK-aware
    split each of those four edges is among the five strongest edges into its head, and on the
    pattern side they are the four strongest head-to-head edges of the graph (on the symmetric
    side value edges from L0H2/L0H3 into the induction heads rank between them)."""
    model, batch, target = _batch("induction")
    graph = dp.DePass(model, attention=attention, progress=False).graph(batch.tokens, target)
    expected = {("L0H1", head, "k") for head in INDUCTION_HEADS}
    if attention == "pattern":
        assert set(_head_to_head(graph, 4)) == expected, _head_to_head(graph, 6)
    for head in INDUCTION_HEADS:
        incoming = [r for r in graph.edge_table() if r["receiver"] == head]
        incoming.sort(key=lambda r: -abs(r["score"]))
        assert ("L0H1", "k") in [(r["sender"], r["type"]) for r in incoming[:5]], head


def test_induction_key_edges_vanish_with_frozen_patterns():
    """The control: with the published value split the same edges are exactly 0."""
    model, batch, target = _batch("induction")
    graph = dp.DePass(model, attention="value", progress=False).graph(batch.tokens, target)
    index = graph.spec.edge_index()
    for head in INDUCTION_HEADS:
        assert float(graph.scores()[index[("L0H1", head, "k")]]) == 0.0


def test_binding_stages_form_a_connected_path_in_the_circuit():
    """The contrastive graph's top-30 circuit holds a path stage 1 -> stage 2 -> stage 3 ->
    logits through the documented heads of ``binding``'s three stages."""
    model, batch, target = _batch("binding")
    graph = dp.DePass(model, progress=False).graph(batch.tokens, target, contrast=batch.corrupted)
    circuit = graph.circuit(k=30)
    (_, first), (_, second), (_, third) = zoo.mechanism("binding").stages
    edges = {(r["sender"], r["receiver"]) for r in circuit.edge_table()}
    reach = {head for head in third if (head, "logits") in edges}
    assert reach, "no stage-3 head reaches the logits in the circuit"
    reach = {s for s in second for r in reach if (s, r) in edges}
    assert reach, "no stage-2 head feeds a stage-3 head that reaches the logits"
    reach = {s for s in first for r in reach if (s, r) in edges}
    assert reach, "no stage-1 head completes the path"
    assert torch.isfinite(graph.edge_scores).all()
