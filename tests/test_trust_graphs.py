"""Circuit graphs at the edges of their inputs: no silent wrong numbers (issue 16).

A contrast padded differently from the prompts, neuron groups in contrastive graphs, malformed
neuron groups, models set up for other tools (``use_split_qkv_input``) and grouped-query
attention on a TransformerBridge each either give the right numbers or a clear refusal.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import depass_lens as dp
from depass_lens.circuits import GraphNodes
from depass_lens.errors import DePassInputError, LosslessnessError, UnsupportedModelError
from tests.conftest import TL, graph_model, make_model, random_tokens

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

LONG = "When Mary and John went to the store , John gave a drink to"
SHORT = "Mary gave a drink to"
LONG_OTHER = "When Alice and Bob went to the garden , Bob gave a book to"
SHORT_OTHER = "Alice gave a book to"


@pytest.fixture(scope="module")
def ioi():
    from depass_lens import zoo

    model = zoo.load("ioi")
    return model, dp.DePass(model)


def _alone(depass: dp.DePass, prompts: list[str], target: dp.Target) -> torch.Tensor:
    """The target on each prompt run alone (no padding anywhere)."""
    return torch.stack([depass.attribute(p, target).target_values[0, 0] for p in prompts])


# ------------------------------------------------------------------ padding of the contrast
def test_contrast_padded_differently_is_refused_with_both_lengths(ioi):
    """Clean ``[long, short]`` against corrupt ``[short, long]``: the rows' real lengths differ,
    so a position-by-position difference means nothing. Before the fix the corrupted run used
    the clean mask and read its target at a pad (``[14.0, 6.8]`` for ``[12.2, 7.2]``)."""
    model, depass = ioi
    target = dp.Logit(model.to_single_token("Mary"))
    clean, corrupt = [LONG, SHORT], [SHORT_OTHER, LONG_OTHER]
    n_long, n_short = (len(model.to_str_tokens(p)) for p in (LONG, SHORT))
    with pytest.raises(DePassInputError) as info:
        depass.graph(clean, target, contrast=corrupt)
    message = str(info.value)
    assert f"{n_long} real tokens" in message and f"{n_short}" in message
    assert "row 0" in message


def test_contrast_padded_alike_gives_each_prompts_change(ioi):
    """Rows of equal real length (padded alike): the target node is T(clean) - T(corrupt) of
    each prompt run alone, and the direct edges add up to it."""
    model, depass = ioi
    target = dp.Logit(model.to_single_token("Mary"))
    clean, corrupt = [LONG, SHORT], [LONG_OTHER, SHORT_OTHER]
    assert [len(model.to_str_tokens(p)) for p in clean] == [
        len(model.to_str_tokens(p)) for p in corrupt
    ]
    graph = depass.graph(clean, target, contrast=corrupt)
    change = _alone(depass, clean, target) - _alone(depass, corrupt, target)
    node = graph.node_scores[:, 0, graph.spec.target]
    torch.testing.assert_close(node, change, rtol=1e-4, atol=1e-4)
    direct = torch.tensor([e.kind == "direct" for e in graph.spec.edges])
    torch.testing.assert_close(
        graph.edge_scores[:, 0, direct].sum(-1), change, rtol=1e-4, atol=1e-4
    )
    assert max(graph.conservation().values()) <= 1e-4


def test_contrast_token_ids_share_the_prompts_mask(ioi):
    """A contrast given as token ids is read with the prompts' attention mask; one padded
    otherwise must be given as text (or aligned by the caller), never silently misread."""
    model, depass = ioi
    target = dp.Logit(model.to_single_token("Mary"))
    clean, corrupt = [LONG, SHORT], [LONG_OTHER, SHORT_OTHER]
    prepared = depass.prepare(clean)
    assert prepared.attention_mask is not None
    by_ids = depass.graph(clean, target, contrast=depass.prepare(corrupt).tokens)
    by_text = depass.graph(clean, target, contrast=corrupt)
    torch.testing.assert_close(by_ids.edge_scores, by_text.edge_scores)


def test_contrast_mask_that_differs_is_refused_in_the_builder():
    """The builder itself refuses a contrast mask that differs from the prompts' mask (its
    other callers give token ids and masks directly)."""
    from depass_lens.circuits.build import depass_graph
    from depass_lens.circuits.spec import GraphNodes as Nodes

    model = graph_model("gpt2", torch.float64)
    depass = dp.DePass(model)
    tokens = random_tokens(model, n_pos=7)
    mask = torch.ones_like(tokens)
    other = mask.clone()
    other[1, -2:] = 0
    with pytest.raises(
        DePassInputError, match="row 1: the prompt has 7 real tokens, its contrast 5"
    ):
        depass_graph(
            depass.adapter,
            tokens,
            mask,
            [dp.Logit(3)],
            ["logit"],
            Nodes(),
            rule=depass.rule,
            split=depass.attention,
            contrast=random_tokens(model, n_pos=7, seed=2),
            contrast_attention_mask=other,
        )


def test_edge_patching_refuses_a_corrupted_batch_padded_otherwise():
    """Edge patching pairs positions like a contrastive graph: a corrupted batch whose own mask
    marks other real positions is refused; one padded alike is accepted."""
    from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric
    from depass_lens.circuits.spec import build_spec

    model = graph_model("gpt2", torch.float64)
    depass = dp.DePass(model)
    spec = build_spec(depass.adapter, GraphNodes(), 7, "unembed.hook_in")
    tokens, corrupt = random_tokens(model, n_pos=7), random_tokens(model, n_pos=7, seed=2)
    mask = torch.ones_like(tokens)
    mask[1, -2:] = 0
    metric = logit_diff_metric(torch.tensor([3, 3]), torch.tensor([5, 5]), mask)

    def patcher(corrupted_mask: torch.Tensor) -> EdgePatcher:
        return EdgePatcher(
            depass.adapter,
            spec,
            tokens,
            metric,
            corrupted=corrupt,
            attention_mask=mask,
            corrupted_attention_mask=corrupted_mask,
        )

    with pytest.raises(
        DePassInputError, match="row 1: the prompt has 5 real tokens, its contrast 7"
    ):
        patcher(torch.ones_like(mask))
    alike = patcher(mask.clone())
    assert alike.clean != alike.corrupt


# ------------------------------------------------------------------ neuron groups, contrastive
def _inflow(graph, receivers: list[int]) -> dict[tuple[str, str], torch.Tensor]:
    """Each (sender, kind)'s edges into ``receivers``, summed: ``[batch]`` per key."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for i, e in enumerate(graph.spec.edges):
        if e.receiver in receivers:
            key = (graph.spec.nodes[e.sender].name, e.kind)
            out[key] = out.get(key, 0) + graph.edge_scores[:, 0, i]
    return out


@pytest.mark.parametrize("family", ["gpt2", "folded", "llama", "gemma"])
def test_neuron_groups_in_contrastive_graphs(family):
    """Under the difference linearisation a neuron group reads its input through the secant of
    the MLP's input norm, not its frozen clean map: every law holds to fp64 precision and the
    groups' edges (and scores) add up to the whole MLP's. Before the fix: conservation 0.02-0.07
    and the groups' inflow 0.264 where the whole MLP's is 0.255 (gpt2)."""
    model = graph_model(family, torch.float64)
    clean, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    depass = dp.DePass(model)
    nodes = GraphNodes(neurons={0: [[3, 4, 5]], 1: [[0, 1], [2], [10, 11, 12, 13]]})
    graph = depass.graph(clean, [dp.Logit(3)], contrast=corrupt, nodes=nodes)
    whole = depass.graph(clean, [dp.Logit(3)], contrast=corrupt)
    errors = graph.conservation()
    assert max(errors.values()) <= TOL[torch.float64], errors
    names = [n.name for n in graph.spec.nodes]
    whole_names = [n.name for n in whole.spec.nodes]
    for layer, parts in ((0, ["L0.mlp[0]"]), (1, ["L1.mlp[0]", "L1.mlp[1]", "L1.mlp[2]"])):
        members = [names.index(p) for p in [*parts, f"L{layer}.mlp.rest"]]
        mlp = whole_names.index(f"L{layer}.mlp")
        split_in, whole_in = _inflow(graph, members), _inflow(whole, [mlp])
        scale = float(whole.edge_scores.abs().max())
        for (sender, kind), value in whole_in.items():
            if sender.startswith("L0.mlp") and layer > 0:
                # the whole graph's L0.mlp is split into a group and a rest in ``graph``
                got = sum(
                    v for (s, k), v in split_in.items() if s.startswith("L0.mlp") and k == kind
                )
            else:
                got = split_in[(sender, kind)]
            assert float((got - value).abs().max()) <= 1e-10 * scale, (sender, kind)
        torch.testing.assert_close(
            graph.node_scores[..., members].sum(-1), whole.node_scores[..., mlp], rtol=0, atol=1e-10
        )
        torch.testing.assert_close(
            graph.node_inputs[..., members].sum(-1), whole.node_inputs[..., mlp], rtol=0, atol=1e-10
        )


def test_neuron_groups_in_contrastive_graphs_fp32():
    model = graph_model("gpt2", torch.float32)
    clean, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    nodes = GraphNodes(neurons={1: [[0, 1], [2]]})
    graph = dp.DePass(model).graph(clean, dp.Logit(3), contrast=corrupt, nodes=nodes)
    errors = graph.conservation()
    assert max(errors.values()) <= TOL[torch.float32], errors


def test_a_broken_exact_graph_is_refused_when_checking(monkeypatch):
    """With ``check`` on (the default) an exact graph whose laws fail is an error, not a
    quiet table: the neuron-group bug above would have raised."""
    from depass_lens.circuits import build

    model = graph_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    original = build.slot_blocks

    def no_keys(*args, **kwargs):
        blocks = original(*args, **kwargs)
        the_slots = args[2]
        return [b for b in blocks if the_slots[b.slots[0]].kind != "k"]

    monkeypatch.setattr(build, "slot_blocks", no_keys)
    with pytest.raises(LosslessnessError, match="outgoing"):
        dp.DePass(model, attention="symmetric").graph(tokens, dp.Logit(3))
    graph = dp.DePass(model, attention="symmetric", check=False).graph(tokens, dp.Logit(3))
    assert graph.conservation()["outgoing"] > 1e-4


# ------------------------------------------------------------------ neuron-group specs
@pytest.mark.parametrize(
    ("neurons", "match"),
    [
        ({0: [[0, 0, 1]]}, "more than once"),
        ({0: [[0.5]]}, "not a neuron index"),
        ({0: [[1.0]]}, "not a neuron index"),
        ({0: [[True]]}, "not a neuron index"),
        ({0: [["3"]]}, "not a neuron index"),
        ({0: [0, 1, 2]}, r"lists of neuron indices, e.g. \{0: \[\[0, 1, 2\]\]\}"),
        ({0: "012"}, "lists of neuron indices"),
        ({0: [[]]}, "empty group"),
        ({0: []}, "no groups"),
        ({0: [[-1]]}, "negative"),
        ({0: [[0, 1], [1, 2]]}, "overlap"),
        ({True: [[0]]}, "layer"),
        ({0.0: [[0]]}, "layer"),
        ([[0]], "a mapping"),
    ],
)
def test_malformed_neuron_groups_are_refused(neurons, match):
    with pytest.raises(DePassInputError, match=match):
        GraphNodes(neurons=neurons)


def test_neuron_groups_out_of_range_are_refused():
    model = graph_model("gpt2", torch.float64)
    depass = dp.DePass(model)
    tokens = random_tokens(model)
    with pytest.raises(DePassInputError, match="out of range"):
        depass.graph(tokens, dp.Logit(3), nodes=GraphNodes(neurons={1: [[model.cfg.d_mlp]]}))
    with pytest.raises(DePassInputError, match="out of range"):
        depass.graph(tokens, dp.Logit(3), nodes=GraphNodes(neurons={-1: [[0]]}))


def test_neuron_indices_of_any_integer_type_are_the_same_groups():
    """NumPy and torch integers name the same neurons as Python ints."""
    np = pytest.importorskip("numpy")
    model = graph_model("gpt2", torch.float64)
    depass = dp.DePass(model)
    tokens = random_tokens(model)
    plain = depass.graph(tokens, dp.Logit(3), nodes=GraphNodes(neurons={1: [[0, 1], [5]]}))
    typed = GraphNodes(neurons={np.int64(1): [np.array([0, 1]), torch.tensor([5])]})
    assert typed.neurons == {1: ((0, 1), (5,))}
    other = depass.graph(tokens, dp.Logit(3), nodes=typed)
    torch.testing.assert_close(other.edge_scores, plain.edge_scores, rtol=0, atol=1e-10)  # 2 runs


# ------------------------------------------------------------------ models set up for other tools
@pytest.mark.skipif(
    TL >= 4,
    reason="TransformerLens 4's native bridge refuses use_split_qkv_input (its AttentionBridge has "
    "no hook before the Q/K/V projections); the bridge's own refusal is in tests/test_bridge.py",
)
def test_split_qkv_input_on_gives_the_clear_message_contrastive_too():
    """``use_split_qkv_input`` left on (as after EAP code): the contrastive graph refuses with the
    absolute graph's message, and the default split's fall-back to ``"value"`` is said once."""
    model = graph_model("gpt2", torch.float64)
    tokens, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    model.set_use_split_qkv_input(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            depass = dp.DePass(model)
        assert depass.attention.side == "value"
        said = [str(w.message) for w in caught if "'value'" in str(w.message)]
        assert len(said) == 1 and "use_split_qkv_input" in said[0]
        for kwargs in ({}, {"contrast": corrupt}, {"contrast": corrupt, "linearisation": "clean"}):
            with pytest.raises(UnsupportedModelError, match="turn off use_split_qkv_input"):
                depass.graph(tokens, dp.Logit(3), **kwargs)
        with pytest.raises(UnsupportedModelError, match="turn off use_split_qkv_input"):
            depass.graph(tokens, dp.Logit(3), attention="symmetric")
    finally:
        model.set_use_split_qkv_input(False)
    with warnings.catch_warnings(record=True) as caught:  # nothing to say once it is off
        warnings.simplefilter("always")
        assert dp.DePass(model).attention.side == "symmetric"
    assert not [w for w in caught if "'value'" in str(w.message)]


def test_difference_refusal_names_what_is_missing_and_only_what_works():
    """A model whose final queries and keys have no hook: the refusal names that (not a QK norm
    it may not have) and its suggestion, linearisation='clean', then works."""
    if TL >= 4:  # a native bridge's rotary attention fires no post-rotary hooks
        model = make_model("llama", torch.float64, n_key_value_heads=None)
    else:  # a QK norm without rotary: the normed queries and keys have no hook
        model = make_model("gpt2", torch.float64, use_qk_norm=True, normalization_type="RMS")
    tokens, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    depass = dp.DePass(model)
    with pytest.raises(UnsupportedModelError) as info:
        depass.graph(tokens, dp.Logit(3), contrast=corrupt)
    message = str(info.value)
    assert "final queries and keys" in message and "linearisation='clean'" in message
    if TL >= 4:
        assert "QK norm without rotary" not in message
    graph = depass.graph(tokens, dp.Logit(3), contrast=corrupt, linearisation="clean")
    assert max(graph.conservation().values()) <= TOL[torch.float64]


def test_recall_contrastive_graph():
    """Zoo ``recall`` (grouped-query attention). TransformerLens 4: the contrastive graph names
    grouped-query attention on a bridge and suggests only what works (TransformerLens 3), not
    linearisation='clean', which fails there too. TransformerLens 3: it is exact."""
    from depass_lens import zoo

    model = zoo.load("recall")
    depass = dp.DePass(model)
    tokens, corrupt = random_tokens(model, n_pos=6, seed=1), random_tokens(model, n_pos=6, seed=2)
    target = dp.LogitDiff(3, 5)
    if TL >= 4:
        for linearisation in ("difference", "clean"):
            with pytest.raises(UnsupportedModelError) as info:
                depass.graph(tokens, target, contrast=corrupt, linearisation=linearisation)
            message = str(info.value)
            assert "grouped-query attention" in message and "TransformerBridge" in message
            assert "linearisation='clean'" not in message
            assert "QK norm" not in message
    else:
        graph = depass.graph(tokens, target, contrast=corrupt)
        assert max(graph.conservation().values()) <= 1e-5
