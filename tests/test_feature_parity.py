"""Parity with circuit-tracer 0.5.0 on the zoo ``ioi`` model with the shipped transcoders.

The fixture (tests/fixtures/circuit_tracer_ioi.*) was written by scripts/circuit_tracer_fixture.py
running circuit-tracer in its own environment. With ``attention="value"``, position 0 left out and
the salient logits as demeaned-unembedding targets, every edge circuit-tracer has must equal
DePass's to 1e-5 of the largest edge (fp32: both are float32 sums of O(d_model * n_layers)
products in different orders). What circuit-tracer leaves out (position embeddings, biases,
``b_dec``, the first position's MLP output) must appear in DePass's graph as named nodes carrying
exactly the rest of each target.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import depass_lens as dp
from depass_lens import zoo
from depass_lens.features.prune import graph_scores
from depass_lens.zoo.saes import load_dictionaries

FIXTURE = Path(__file__).parent / "fixtures" / "circuit_tracer_ioi"
ROOT = Path(__file__).parent.parent
TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    for entry in meta["transcoder_files"]:
        for name, digest in entry["sha256"].items():
            got = hashlib.sha256((ROOT / entry["folder"] / name).read_bytes()).hexdigest()
            if got != digest:
                pytest.fail(
                    f"{entry['folder']}/{name} changed since the circuit-tracer fixture was "
                    "written: regenerate it with scripts/circuit_tracer_fixture.py"
                )
    return meta, load_file(str(FIXTURE.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def graphs(fixture):
    meta, tensors = fixture
    model = zoo.load("ioi")
    depass = dp.DePass(model, attention="value", progress=False)
    dictionaries = load_dictionaries("ioi")
    out = []
    for i in range(len(meta["prompts"])):
        tokens = tensors["tokens"][i : i + 1]
        graph = depass.feature_graph(
            tokens, "top_logits", dictionaries=dictionaries, zero_first_position=True
        )
        out.append(graph)
    return out


def dense(tensors, i: int) -> torch.Tensor:
    shape = tensors[f"p{i}.adjacency.shape"].tolist()
    bits = tensors[f"p{i}.adjacency.mask_bits"]
    mask = ((bits[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).flatten()
    adjacency = torch.zeros(shape)
    adjacency[mask[: shape[0] * shape[1]].bool().view(shape)] = tensors[f"p{i}.adjacency.values"]
    return adjacency


def tracer_nodes(tensors, i: int, n_pos: int, n_layers: int) -> list[str]:
    """circuit-tracer's node order, named as DePass names them."""
    features = [f"L{L}.mlp[{f}]@{p}" for L, p, f in tensors[f"p{i}.active_features"].tolist()]
    errors = [f"L{L}.mlp.error@{p}" for L in range(n_layers) for p in range(n_pos)]
    tokens = [f"token@{p}" for p in range(n_pos)]
    return features + errors + tokens


def test_nodes_and_activations_match(fixture, graphs):
    _, tensors = fixture
    for i, graph in enumerate(graphs):
        names = tracer_nodes(tensors, i, len(graph.tokens), 3)
        n_features = len(tensors[f"p{i}.activation_values"])
        ours = [n.name for n in graph.nodes if n.kind == "latent"]
        assert ours == names[:n_features]  # the same active latents, in the same order
        acts = graph.activation[: len(ours)]
        torch.testing.assert_close(acts, tensors[f"p{i}.activation_values"], rtol=TOL, atol=TOL)
        assert graph.settings["target_probabilities"] == pytest.approx(
            tensors[f"p{i}.logit_probabilities"].tolist(), rel=1e-5
        )


def _ours(graph, rows: list[str], cols: list[str]) -> torch.Tensor:
    index = {n.name: j for j, n in enumerate(graph.nodes)}
    col = torch.tensor([index[c] for c in cols])
    return torch.stack([graph.incoming(r)[col] for r in rows])


def test_full_adjacency_equals_circuit_tracer(fixture, graphs):
    meta, tensors = fixture
    full = [i for i, p in enumerate(meta["prompts"]) if p["full_adjacency_in_fixture"]]
    assert full
    for i in full:
        graph = graphs[i]
        names = tracer_nodes(tensors, i, len(graph.tokens), 3)
        theirs = dense(tensors, i)
        n_features = len(tensors[f"p{i}.activation_values"])
        targets = [graph.nodes[t].name for t in graph.targets]
        rows = names[:n_features] + targets
        expected = torch.cat([theirs[:n_features], theirs[-len(targets) :]])[:, : len(names)]
        kept = [j for j, name in enumerate(names) if not name.endswith("error@0")]
        got = _ours(graph, rows, [names[j] for j in kept])
        scale = float(expected.abs().max())
        assert float((got - expected[:, kept]).abs().max()) / scale < TOL
        dropped = [j for j, name in enumerate(names) if name.endswith("error@0")]
        assert float(expected[:, dropped].abs().max()) == 0.0  # circuit-tracer zeroes them


def test_logit_rows_equal_circuit_tracer_and_the_rest_is_named(fixture, graphs):
    _, tensors = fixture
    for i, graph in enumerate(graphs):
        names = tracer_nodes(tensors, i, len(graph.tokens), 3)
        expected = tensors[f"p{i}.logit_rows"][:, : len(names)]
        targets = [graph.nodes[t].name for t in graph.targets]
        kept = [j for j, name in enumerate(names) if not name.endswith("error@0")]
        got = _ours(graph, targets, [names[j] for j in kept])
        scale = float(expected.abs().max())
        assert float((got - expected[:, kept]).abs().max()) / scale < TOL
        # what circuit-tracer leaves out: named nodes, carrying exactly the rest of the target
        for k, target in enumerate(graph.targets):
            row = graph.incoming(target)
            tracer_total = float(expected[k].sum())
            shared = torch.tensor([graph.index(names[j]) for j in kept])
            rest = float(row.sum() - row[shared].sum())
            value, own = float(graph.value[target]), float(graph.own[target])
            assert rest == pytest.approx(value - own - tracer_total, abs=TOL * abs(value))
            common = set(shared.tolist())
            left_out = {
                n.kind for j, n in enumerate(graph.nodes) if j not in common and float(row[j])
            }
            assert {"position", "constant", "error"} <= left_out


def test_scores_on_circuit_tracers_nodes_equal_its_scores(fixture, graphs):
    """On the nodes circuit-tracer has (features, errors, tokens, logits), replacement and
    completeness follow its formulas: equal to its scores to float32 rounding."""
    meta, tensors = fixture
    for i, graph in enumerate(graphs):
        names = set(tracer_nodes(tensors, i, len(graph.tokens), 3))
        keep = torch.tensor(
            [
                (n.name in names and not n.name.endswith("error@0")) or n.kind == "target"
                for n in graph.nodes
            ]
        )
        scores = graph_scores(graph.subgraph(keep))
        expected = meta["prompts"][i]
        assert scores["replacement"] == pytest.approx(expected["replacement_score"], abs=1e-5)
        assert scores["completeness"] == pytest.approx(expected["completeness_score"], abs=1e-5)
