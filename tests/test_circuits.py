"""Circuit graphs: conservation at every node, equality with a naive per-edge computation,
agreement with node-level DePass, contrastive graphs, extraction and clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

import depass_lens as dp
from depass_lens.circuits import GraphNodes
from depass_lens.errors import DePassInputError, UnsupportedModelError
from tests.conftest import AGREEMENT, FAMILIES, graph_model, random_tokens
from tests.naive_edges import NODES, NaiveDifferenceModel, NaiveLinearModel, receiver_key

pytestmark = pytest.mark.numerics  # also run under test.sh's second math configuration

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TARGETS = [dp.Logit(3), dp.LogitDiff(5, 7, pos=-2)]


def _splits(family: str) -> list[str]:
    return ["value", "symmetric"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conservation_every_family(family, dtype):
    """Outgoing edges sum to a node's score, incoming edges to its input's score, input plus own
    constants to its score, and the target to the sources plus all constants: both ways, every
    family, both attention splits."""
    model = graph_model(family, dtype)
    tokens = random_tokens(model, batch=2, n_pos=7)
    for side in _splits(family):
        graph = dp.DePass(model, attention=side).graph(tokens, TARGETS)
        for law, error in graph.conservation().items():
            assert error <= TOL[dtype], (side, law, error)


@pytest.mark.parametrize("side", ["value", "symmetric"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edges_equal_naive_computation(family, side):
    """Each edge equals the naive linear model's response to that one sender injected into that
    one receiver input (its own code, tests/naive_edges.py), to AGREEMENT in fp32."""
    model = graph_model(family, torch.float32, n_layers=2)
    tokens = random_tokens(model, batch=1, n_pos=6)
    graph = dp.DePass(model, attention=dp.AttentionSplit(side, nodes=NODES)).graph(
        tokens, dp.Logit(3)
    )
    naive = NaiveLinearModel(model, tokens, side)
    readout = torch.zeros(6, model.cfg.d_model)
    readout[-1] = model.W_U[:, 3].detach()
    scale = float(graph.edge_scores.abs().max())
    edges = list(range(graph.n_edges))
    if side != "value":  # the naive pattern side is slow: every kind of edge, 40 at random
        edges = random.Random(0).sample(edges, 40)
    kinds = set()
    for i in edges:
        edge = graph.spec.edges[i]
        sender, receiver = graph.spec.nodes[edge.sender].name, graph.spec.nodes[edge.receiver].name
        expected = naive.target(
            {receiver_key(receiver, edge.kind): naive.sender_output(sender)}, readout
        )
        bound = AGREEMENT[torch.float32] * scale
        assert abs(expected - float(graph.edge_scores[0, 0, i])) <= bound, (sender, receiver)
        kinds.add(edge.kind)
    assert kinds == {"q", "k", "v", "mlp", "direct"}


def test_query_key_edges_vanish_with_frozen_patterns():
    model = graph_model("gpt2", torch.float64)
    graph = dp.DePass(model, attention="value").graph(random_tokens(model), dp.Logit(3))
    qk = torch.tensor([e.kind in ("q", "k") for e in graph.spec.edges])
    assert float(graph.edge_scores[..., qk].abs().max()) == 0.0
    symmetric = dp.DePass(model, attention="symmetric").graph(random_tokens(model), dp.Logit(3))
    assert float(symmetric.edge_scores[..., qk].abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "neox", "attn_only"])
def test_node_scores_equal_node_level_depass(family):
    """Head and MLP node scores equal DePass's Heads/Modules attributions (another code path),
    the target node holds the target's value."""
    model = graph_model(family, torch.float64)
    tokens = random_tokens(model, batch=2)
    depass = dp.DePass(model, attention="symmetric")
    graph = depass.graph(tokens, TARGETS)
    heads = depass.attribute(tokens, TARGETS, dp.Heads(), mode="adjoint")
    for i, node in enumerate(graph.spec.nodes):
        if node.kind == "head":
            j = [str(lab) for lab in heads.labels].index(node.name)
            torch.testing.assert_close(graph.node_scores[..., i], heads.scores[..., j])
    if not model.cfg.attn_only:
        modules = depass.attribute(tokens, TARGETS, dp.Modules(), mode="adjoint")
        labels = [str(lab) for lab in modules.labels]
        for i, node in enumerate(graph.spec.nodes):
            if node.kind == "mlp":
                j = labels.index(f"L{node.layer}.mlp")
                torch.testing.assert_close(graph.node_scores[..., i], modules.scores[..., j])
    torch.testing.assert_close(graph.node_scores[..., graph.spec.target], graph.target_values)
    torch.testing.assert_close(graph.target_values, heads.target_values)


def test_contrastive_graph_with_the_clean_linearisation():
    """Edges use out(clean) - out(corrupt) with the clean run's gradients: outgoing and incoming
    conservation still hold, and a contrast with itself gives an all-zero graph (up to fp64
    rounding: the two runs' outputs may round differently, e.g. batched apart or on another
    kernel path, so 1e-10 of the real contrast's largest edge, like the conservation errors)."""
    model = graph_model("llama", torch.float64)
    clean, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    depass = dp.DePass(model, attention="symmetric")
    graph = depass.graph(clean, TARGETS, contrast=corrupt, linearisation="clean")
    assert graph.contrast and not graph.exact
    errors = graph.conservation()
    assert set(errors) == {"outgoing", "incoming"}
    assert max(errors.values()) <= 1e-10
    delta = model(clean)[:, -1, 3] - model(corrupt)[:, -1, 3]
    torch.testing.assert_close(graph.node_scores[:, 0, graph.spec.target], delta.detach())
    same = depass.graph(clean, TARGETS, contrast=clean, linearisation="clean")
    scale = float(graph.edge_scores.abs().max())
    assert scale > 0 and float(same.edge_scores.abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"moe"}))
def test_difference_graph_is_exact_every_family(family, dtype):
    """With the difference (secant) linearisation every law holds relative to the corrupted run:
    each node's inflow equals its outflow (up to its recorded quadrature remainder), and the
    direct edges sum to the target's actual change."""
    model = graph_model(family, dtype)
    clean, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    depass = dp.DePass(model)
    graph = depass.graph(clean, TARGETS, contrast=corrupt)
    assert graph.exact and graph.linearisation == "difference"
    errors = graph.conservation()
    assert set(errors) == {"outgoing", "incoming", "node", "total"}
    assert max(errors.values()) <= TOL[dtype], errors
    values = [depass.attribute(t, dp.Logit(3)).target_values[:, 0] for t in (clean, corrupt)]
    change = values[0] - values[1]  # logits before any output soft cap, as targets read them
    torch.testing.assert_close(graph.node_scores[:, 0, graph.spec.target], change)
    direct = torch.tensor([e.kind == "direct" for e in graph.spec.edges])
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    total = graph.edge_scores[:, 0, direct].sum(-1)
    torch.testing.assert_close(total, change, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_difference_edges_equal_naive_secant_model(family, dtype):
    """Each contrastive edge equals a naive secant model's response (tests/naive_edges.py) to
    that sender's change injected into that receiver input: 1e-6 (fp32), 1e-10 (fp64). Both
    integrate the softmax on the path between the runs with the same fixed quadrature."""
    model = graph_model(family, dtype, n_layers=2)
    clean = random_tokens(model, batch=1, n_pos=6, seed=1)
    corrupt = random_tokens(model, batch=1, n_pos=6, seed=2)
    split = dp.AttentionSplit("value", nodes=NODES)  # the quadrature of the difference path
    graph = dp.DePass(model, attention=split).graph(clean, dp.Logit(3), contrast=corrupt)
    naive = NaiveDifferenceModel(model, clean, corrupt)
    readout = torch.zeros(6, model.cfg.d_model, dtype=dtype)
    readout[-1] = model.W_U[:, 3].detach()
    scale = float(graph.edge_scores.abs().max())
    tolerance = 1e-6 if dtype == torch.float32 else 1e-10
    for i in random.Random(0).sample(range(graph.n_edges), 30):
        edge = graph.spec.edges[i]
        sender, receiver = graph.spec.nodes[edge.sender].name, graph.spec.nodes[edge.receiver].name
        if sender.endswith(".b_O"):
            continue
        expected = naive.target(
            {receiver_key(receiver, edge.kind): naive.sender_change(sender)}, readout
        )
        assert abs(expected - float(graph.edge_scores[0, 0, i])) <= tolerance * scale


def test_batch_with_padding_equals_prompts_alone():
    model = graph_model("gpt2", torch.float64)
    a, b = random_tokens(model, batch=1, n_pos=7, seed=3), random_tokens(model, 1, 5, seed=4)
    padded = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=b.dtype), b], 1)])
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    depass = dp.DePass(model, attention="symmetric")
    both = depass.graph(padded, dp.Logit(3), attention_mask=mask)
    assert max(both.conservation().values()) <= 1e-10
    alone = depass.graph(b, dp.Logit(3))
    torch.testing.assert_close(both.edge_scores[1], alone.edge_scores[0])


def test_token_nodes_and_positions():
    model = graph_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1, n_pos=6)
    depass = dp.DePass(model)
    pooled = depass.graph(tokens, dp.Logit(3), by_position=True)
    assert pooled.edge_scores_by_pos is not None
    torch.testing.assert_close(pooled.edge_scores_by_pos.sum(-1), pooled.edge_scores)
    per_token = depass.graph(tokens, dp.Logit(3), nodes="tokens")
    assert max(per_token.conservation().values()) <= 1e-10
    # the token nodes' edges into each receiver add up to the pooled embedding's edge
    pooled_index = pooled.spec.edge_index()
    sums: dict[tuple[str, str], float] = {}
    for i, edge in enumerate(per_token.spec.edges):
        sender = per_token.spec.nodes[edge.sender]
        if sender.kind == "token":
            key = (per_token.spec.nodes[edge.receiver].name, edge.kind)
            sums[key] = sums.get(key, 0.0) + float(per_token.edge_scores[0, 0, i])
    for (receiver, kind), total in sums.items():
        expected = float(pooled.edge_scores[0, 0, pooled_index[("embed", receiver, kind)]])
        assert abs(total - expected) <= 1e-10 * max(1.0, abs(expected))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_neuron_groups(family):
    model = graph_model(family, torch.float64)
    tokens = random_tokens(model)
    nodes = GraphNodes(neurons={1: [[0, 1, 2], [10, 11]]})
    graph = dp.DePass(model).graph(tokens, dp.Logit(3), nodes=nodes)
    names = [n.name for n in graph.spec.nodes]
    assert {"L1.mlp[0]", "L1.mlp[1]", "L1.mlp.rest", "L0.mlp", "L2.mlp"} <= set(names)
    assert max(graph.conservation().values()) <= 1e-10
    whole = dp.DePass(model).graph(tokens, dp.Logit(3))
    parts = [names.index(n) for n in ("L1.mlp[0]", "L1.mlp[1]", "L1.mlp.rest")]
    mlp = [n.name for n in whole.spec.nodes].index("L1.mlp")
    torch.testing.assert_close(
        graph.node_scores[..., parts].sum(-1), whole.node_scores[..., mlp], rtol=1e-9, atol=1e-9
    )


def test_hidden_state_target_reads_part_of_the_graph():
    model = graph_model("gpt2", torch.float64)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    target = dp.HiddenState("blocks.1.hook_resid_mid", pos=-1, direction=direction.double())
    graph = dp.DePass(model).graph(random_tokens(model), target)
    names = [n.name for n in graph.spec.nodes]
    assert "L1H0" in names and "L1.mlp" not in names and "L2H0" not in names
    assert names[-1] == "target"
    assert max(graph.conservation().values()) <= 1e-10


def test_removing_a_path_breaks_conservation(monkeypatch):
    """Lose the key-side gradients on purpose: outgoing conservation fails visibly."""
    from depass_lens.circuits import build

    model = graph_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    original = build.slot_blocks

    def no_keys(adapter, spec, the_slots, grads, acts, *rest, **options):
        blocks = original(adapter, spec, the_slots, grads, acts, *rest, **options)
        return [b for b in blocks if the_slots[b.slots[0]].kind != "k"]

    monkeypatch.setattr(build, "slot_blocks", no_keys)
    # check=False: with checking on, the broken graph is refused (tests/test_trust_graphs.py)
    graph = dp.DePass(model, attention="symmetric", check=False).graph(tokens, dp.Logit(3))
    assert graph.conservation()["outgoing"] > 1e-4


def test_extraction_and_exports():
    model = graph_model("gpt2", torch.float64)
    graph = dp.DePass(model, attention="symmetric").graph(random_tokens(model, batch=2), TARGETS)
    top = graph.top(5)
    assert len(top) == 5 and abs(top[0][1]) >= abs(top[-1][1])
    circuit = graph.circuit(k=10, prune=False)
    assert circuit.n_edges == 10
    pruned = graph.circuit(k=10)
    assert pruned.n_edges <= 10
    for row in pruned.edge_table():  # every kept edge lies on an input-to-target path
        assert row["sender"].startswith(("embed", "L")) and row["type"] in "qkv mlp direct"
    threshold = graph.circuit(threshold=float(graph.scores().abs().max()) / 2, prune=False)
    assert 1 <= threshold.n_edges < graph.n_edges
    data = json.loads(graph.to_json())
    assert len(data["edges"]) == graph.n_edges and data["nodes"][-1]["node"] == "logits"
    dot = pruned.to_dot()
    assert dot.startswith("digraph") and dot.count("->") == pruned.n_edges
    assert list(graph.edges.columns) == ["sender", "receiver", "type", "score"]
    assert {"score", "inflow", "outflow", "own_bias"} <= set(graph.nodes.columns)
    assert graph.mean().edge_scores.shape[0] == 1


def test_clear_errors():
    model = graph_model("gpt2", torch.float64)
    tokens = random_tokens(model, n_pos=7)
    depass = dp.DePass(model)
    with pytest.raises(DePassInputError, match="linear MLP rule"):
        depass.graph(tokens, dp.Logit(3), rule="softmax")
    with pytest.raises(DePassInputError, match="position by position"):
        depass.graph(tokens, dp.Logit(3), contrast=random_tokens(model, n_pos=6))
    with pytest.raises(DePassInputError, match="out of range"):
        depass.graph(tokens, dp.Logit(3), nodes=GraphNodes(neurons={7: [[0]]}))
    with pytest.raises(DePassInputError, match="out of range"):
        depass.graph(tokens, dp.Logit(3), nodes=GraphNodes(neurons={1: [[0, 999]]}))
    with pytest.raises(DePassInputError, match="overlap"):
        depass.graph(tokens, dp.Logit(3), nodes=GraphNodes(neurons={1: [[0, 1], [1]]}))
    with pytest.raises(DePassInputError, match="residual stream"):
        depass.graph(tokens, dp.AttentionScore(1, 0, query_pos=-1, key_pos=0))
    with pytest.raises(DePassInputError, match="linearisation must be"):
        depass.graph(tokens, dp.Logit(3), contrast=tokens, linearisation="secant")
    moe = graph_model("moe", torch.float64)
    with pytest.raises(UnsupportedModelError, match="mixture of experts"):
        dp.DePass(moe).graph(random_tokens(moe), dp.Logit(3), contrast=random_tokens(moe, seed=5))
    graph = depass.graph(tokens, dp.Logit(3))
    with pytest.raises(DePassInputError, match="larger than the graph"):
        graph.circuit(k=graph.n_edges + 1)
    with pytest.raises(DePassInputError, match="exactly one"):
        graph.circuit()
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in  # restored


@pytest.mark.parametrize("family", ["gpt2", "attn_only", "no_norm"])
def test_split_inputs_have_the_gradients_of_their_own_node(family):
    """Inside ``adapter.split_inputs()`` the model computes the same logits, and the gradient at
    each per-node input (one head's query/key/value copy, the MLP's copy, the stream at
    resid_mid) is the derivative of a run where only that input moves (central differences):
    on a TransformerBridge the adapter builds these inputs itself."""
    from depass_lens.adapters import make_adapter

    model = graph_model(family, torch.float64)
    adapter = make_adapter(model)
    tokens = random_tokens(model, batch=2, n_pos=7)
    names = ["blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input"]
    if family != "attn_only":
        names += ["blocks.1.hook_mlp_in", "blocks.1.hook_resid_mid"]

    def run(at: str | None = None, delta: torch.Tensor | None = None):
        live = {}

        def keep(value, hook):
            live[hook.name] = value
            return value + delta if hook.name == at else None

        with torch.enable_grad(), adapter.split_inputs(), adapter.hooks([(n, keep) for n in names]):
            logits = model(tokens)
        return logits[:, -1, 3].sum(), live

    value, live = run()
    torch.testing.assert_close(value, model(tokens)[:, -1, 3].sum(), rtol=0, atol=1e-12)
    grads = torch.autograd.grad(value, [live[n] for n in names])
    gen = torch.Generator().manual_seed(0)
    for name, grad in zip(names, grads):
        delta = torch.randn(live[name].shape, generator=gen, dtype=torch.float64)
        if name.endswith(("q_input", "k_input", "v_input")):
            delta[:, :, 1:] = 0  # head 0 only: the others keep the model's value
        eps = 1e-5
        moved = (run(name, eps * delta)[0] - run(name, -eps * delta)[0]) / (2 * eps)
        assert float(moved) == pytest.approx(float((grad * delta).sum()), rel=1e-6, abs=1e-9)
    assert not getattr(model.cfg, "use_hook_mlp_in", False)  # restored
