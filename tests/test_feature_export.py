"""Feature graphs pruned, scored and exported: circuit-tracer's pruning rules, the explorer's
JSON (validated by the page's own checker), circuit-tracer / Neuronpedia graph JSON, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import depass_lens as dp
from depass_lens.cli import main
from depass_lens.errors import DePassInputError
from depass_lens.explorer import validate_graph
from depass_lens.features.export import to_explorer_json, to_neuronpedia_json
from depass_lens.features.influence import influence
from depass_lens.features.prune import graph_scores, prune, target_weights
from tests.conftest import make_model, random_tokens
from tests.test_feature_graph import dictionaries


@pytest.fixture(scope="module")
def graph():
    model = make_model("gpt2", torch.float64)
    depass = dp.DePass(model, attention="symmetric", progress=False)
    tokens = random_tokens(model, batch=1, n_pos=7)
    return depass.feature_graph(tokens, dp.Logit(3), dictionaries=dictionaries(model))


def test_influence_is_the_path_sum(graph):
    """Against the dense series ``w (N + N^2 + ...)`` computed by matrix powers."""
    weights = target_weights(graph)
    got = influence(graph.edges, graph.receivers, weights)
    dense = graph.adjacency().abs()
    dense = dense / dense.sum(-1, keepdim=True).clamp_min(1e-300)
    seed = torch.zeros(len(graph.nodes), dtype=dense.dtype)
    seed[graph.receivers] = weights
    expected, power = torch.zeros_like(seed), seed @ dense
    while bool(power.abs().max() > 0):
        expected += power
        power = power @ dense
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_pruning_keeps_what_circuit_tracer_keeps(graph):
    everything = prune(graph, 1.0, 1.0)
    sends = graph.edges.abs().sum(0) > 0
    kinds = [n.kind for n in graph.nodes]
    inputs = torch.tensor([k in ("token", "position", "constant", "target") for k in kinds])
    assert bool(everything.nodes[inputs].all())  # inputs and targets always stay
    tight = prune(graph, 0.5, 0.9)
    assert int(tight.nodes.sum()) < int(everything.nodes.sum())
    assert bool((tight.nodes <= everything.nodes).all())
    latent = torch.tensor([k == "latent" for k in kinds])
    kept_latents = tight.nodes & latent
    # every kept latent sends an edge and receives one, along kept edges only
    assert bool(tight.edges.any(0)[kept_latents].all())
    rows = {int(node): r for r, node in enumerate(graph.receivers)}
    for j in kept_latents.nonzero().flatten().tolist():
        assert bool(tight.edges[rows[j]].any())
    assert not bool(tight.edges[:, ~tight.nodes].any())
    assert bool(sends[kept_latents].all())
    with pytest.raises(DePassInputError, match="node_threshold"):
        prune(graph, 1.5)


def test_scores_are_fractions_and_error_share_is_exact(graph):
    scores = graph_scores(graph)
    assert 0 < scores["replacement"] <= 1 and 0 < scores["completeness"] <= 1
    errors = [i for i, n in enumerate(graph.nodes) if n.kind == "error"]
    target = graph.targets[0]
    expected = float(graph.incoming(target)[errors].sum() / graph.value[target])
    assert scores["error_share"] == pytest.approx(expected, rel=1e-12)


def test_explorer_json_is_valid_and_carries_every_kind(graph):
    pruned = prune(graph, 0.9, 0.99)
    data = to_explorer_json(graph, pruned, model="random gpt2")
    validate_graph(data)
    assert {e[2] for e in data["edges"]} == {"value", "query", "key"}
    assert len(data["nodes"]) == int(pruned.nodes.sum())
    names = [n["id"] for n in data["nodes"]]
    for source, target, _, _ in data["edges"]:
        assert 0 <= source < len(names) and 0 <= target < len(names)
    full = to_explorer_json(graph)
    per_pair: dict[tuple[int, int], float] = {}
    for source, target, _, weight in full["edges"]:
        per_pair[(source, target)] = per_pair.get((source, target), 0.0) + weight
    row = graph.incoming(graph.targets[0])
    target_index = [n["id"] for n in full["nodes"]].index(graph.nodes[graph.targets[0]].name)
    total = sum(w for (s, t), w in per_pair.items() if t == target_index)
    assert total == pytest.approx(float(row.sum()), rel=1e-10)  # kinds add up to the edges


def test_neuronpedia_json_follows_circuit_tracers_schema(graph):
    pruned = prune(graph, 0.9, 0.99)
    data = to_neuronpedia_json(
        graph, pruned, graph.settings["token_ids"], slug="test", scan="random"
    )
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
    types = {n["feature_type"] for n in data["nodes"]}
    assert types <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    latent = next(
        n for n in graph.nodes if n.kind == "latent" and pruned.nodes[graph.index(n.name)]
    )
    assert f"{latent.layer}_{latent.index}_{latent.pos}" in ids
    left_out = data["metadata"]["depass_nodes_left_out"]
    assert any(name.startswith("position@") for name in left_out)


def test_cli_writes_the_explorer_page_and_json(tmp_path, capsys):
    out, data = tmp_path / "graph.html", tmp_path / "graph.json"
    np_out = tmp_path / "np.json"
    args = ["feature-graph", "--model", "ioi", "--out", str(out), "--json", str(data)]
    args += ["--neuronpedia", str(np_out), "--attention", "value"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "feature graph:" in printed and "exactness" in printed
    page = out.read_text()
    assert "depass_lens.feature_graph/1" in page and "http://" not in page
    graph_json = json.loads(data.read_text())
    validate_graph(graph_json)
    assert any(n.get("lens") for n in graph_json["nodes"] if n["kind"] == "latent")
    assert any(n.get("top_prompts") for n in graph_json["nodes"] if n["kind"] == "latent")
    assert json.loads(np_out.read_text())["nodes"]


def test_cli_refuses_a_model_without_dictionaries(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["feature-graph", "--model", "bilingual", "--out", str(tmp_path / "g.html")])
    assert exit_info.value.code == 2
