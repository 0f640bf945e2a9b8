"""Edge patching, the EAP / EAP-IG / ACDC baselines, faithfulness curves, plots and the CLI."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.adapters import make_adapter
from depass_lens.circuits import GraphNodes, build_spec, smallest_circuit
from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric
from depass_lens.errors import DePassInputError
from depass_lens.evaluation.circuit_baselines import acdc, eap_graph
from depass_lens.evaluation.circuit_faithfulness import (
    acdc_curve,
    budget_grid,
    figure,
    graph_curve,
    wins,
)
from tests.conftest import graph_model, random_tokens

ANSWERS, WRONG = torch.tensor([3, 4]), torch.tensor([5, 6])


def _setup(family: str = "gpt2", dtype=torch.float64):
    model = graph_model(family, dtype)
    clean, corrupt = random_tokens(model, seed=1), random_tokens(model, seed=2)
    depass = dp.DePass(model)
    spec = build_spec(depass.adapter, GraphNodes(), clean.shape[1])
    patcher = EdgePatcher(
        depass.adapter, spec, clean, logit_diff_metric(ANSWERS, WRONG), corrupted=corrupt
    )
    return model, depass, spec, patcher, clean, corrupt


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "gemma", "attn_only"])
def test_patching_all_and_no_edges_reproduce_clean_and_corrupted_runs(family):
    model, _, spec, patcher, clean, corrupt = _setup(family)
    everything = torch.ones(len(spec.edges), dtype=torch.bool)
    torch.testing.assert_close(patcher.logits(everything), model(clean))
    torch.testing.assert_close(patcher.logits(~everything), model(corrupt))
    assert patcher.faithfulness(everything) == pytest.approx(1.0)
    # patched-with-nothing vs the plain corrupted run: two fp64 computations of the metric
    assert patcher.faithfulness(~everything) == pytest.approx(0.0, abs=1e-10)
    assert not getattr(model.cfg, "use_split_qkv_input", False)  # switched off again


def test_patching_one_edge_changes_only_its_receiver():
    """Removing embed -> L0H0 (value) gives L0H0 the corrupted run's values and changes nothing
    else: the same run as a hand-written hook that swaps head 0's ``hook_v`` for the corrupted
    one (layer 0's value input is the embedding alone), on either backend."""
    model, _, spec, patcher, clean, corrupt = _setup()
    keep = torch.ones(len(spec.edges), dtype=torch.bool)
    keep[spec.edge_index()[("embed", "L0H0", "v")]] = False
    _, corrupt_cache = model.run_with_cache(corrupt)

    def swap(value, hook):
        value = value.clone()
        value[:, :, 0] = corrupt_cache["blocks.0.attn.hook_v"][:, :, 0]
        return value

    expected = model.run_with_hooks(clean, fwd_hooks=[("blocks.0.attn.hook_v", swap)])
    torch.testing.assert_close(patcher.logits(keep), expected)
    assert not torch.allclose(expected, model(clean))  # the edge matters


def test_patcher_errors():
    model, depass, spec, _, clean, corrupt = _setup()
    metric = logit_diff_metric(ANSWERS, WRONG)
    with pytest.raises(DePassInputError, match="same shape"):
        EdgePatcher(depass.adapter, spec, clean, metric, corrupted=corrupt[:, :-1])
    groups = build_spec(depass.adapter, GraphNodes(neurons={0: [[1, 2]]}), clean.shape[1])
    with pytest.raises(DePassInputError, match="whole MLPs"):
        EdgePatcher(depass.adapter, groups, clean, metric, corrupted=corrupt)
    patcher = EdgePatcher(depass.adapter, spec, clean, metric, corrupted=corrupt)
    with pytest.raises(DePassInputError, match="boolean mask"):
        patcher.logits(torch.ones(3, dtype=torch.bool))


def test_mean_ablation_reference():
    _, depass, spec, _, clean, corrupt = _setup()
    patcher = EdgePatcher(
        depass.adapter, spec, clean, logit_diff_metric(ANSWERS, WRONG), ablation="mean"
    )
    keep = torch.ones(len(spec.edges), dtype=torch.bool)
    assert patcher.faithfulness(keep) == pytest.approx(1.0)
    assert abs(patcher.corrupt - patcher.clean) > 1e-6  # means differ from each prompt


def _finite_difference(model, clean, delta, hook, head, embed=None, eps=1e-5):
    """d metric / d eps with ``eps * delta`` added to one head's input (central differences)."""

    def metric(e: float) -> torch.Tensor:
        def add(value, hook):
            value = value.clone()
            value[:, :, head] += e * delta
            return value

        hooks = [(hook, add)]
        if embed is not None:
            hooks.append(("hook_embed", lambda value, hook: embed))
        adapter = make_adapter(model)
        with adapter.split_inputs(), adapter.hooks(hooks):
            logits = model(clean)
        return logit_diff_metric(ANSWERS, WRONG)(logits)

    return ((metric(eps) - metric(-eps)) / (2 * eps)).detach()


@pytest.mark.parametrize("steps", [None, 1, 3])
def test_eap_and_eap_ig_match_finite_differences(steps):
    """EAP's edge score is ``<out_A(clean) - out_A(corrupt), dm/d in_B>`` at the clean input;
    EAP-IG averages the gradient over token embeddings on the path corrupt -> clean (midpoints).
    Both checked against central finite differences of the real model with the sender's change
    added to that one receiver input (hand-written hooks)."""
    model, depass, spec, _, clean, corrupt = _setup()
    target = dp.LogitDiff(ANSWERS, WRONG)
    graph = eap_graph(depass.adapter, spec, clean, corrupt, [target], ["ld"], steps=steps)
    _, clean_cache = model.run_with_cache(clean)
    _, corrupt_cache = model.run_with_cache(corrupt)
    hook_z = "blocks.0.attn.hook_z"
    z = clean_cache[hook_z][:, :, 1] - corrupt_cache[hook_z][:, :, 1]
    delta = z @ model.blocks[0].attn.W_O[1]
    alphas = [None] if steps is None else [(k + 0.5) / steps for k in range(steps)]
    index = spec.edge_index()
    for layer, head, side in [(1, 2, "q"), (2, 0, "k"), (1, 3, "v")]:
        expected = 0.0
        for alpha in alphas:
            embed = None
            if alpha is not None:
                start = corrupt_cache["hook_embed"]
                embed = start + alpha * (clean_cache["hook_embed"] - start)
            hook = f"blocks.{layer}.hook_{side}_input"
            expected = expected + _finite_difference(model, clean, delta, hook, head, embed)
        got = graph.edge_scores[:, 0, index[("L0H1", f"L{layer}H{head}", side)]]
        torch.testing.assert_close(got, expected / len(alphas), rtol=1e-5, atol=1e-7)


def test_eap_against_itself_is_zero():
    _, depass, spec, _, clean, _ = _setup("attn_only")
    target = dp.LogitDiff(ANSWERS, WRONG)
    same = eap_graph(depass.adapter, spec, clean, clean, [target], ["ld"], steps=4)
    # clean and "corrupted" activations come from two runs, whose fp64 rounding may differ (e.g.
    # MKL's results depend on memory alignment): zero up to that, far below any real edge
    assert float(same.edge_scores.abs().max()) <= 1e-10


def test_acdc_and_curves():
    model, depass, spec, patcher, clean, corrupt = _setup("attn_only")
    result = acdc(patcher, [0.3, 0.03, 0.003])
    sizes = [int(c.sum()) for c in result.circuits]
    assert sizes == sorted(sizes)  # lower thresholds keep more edges
    assert result.forwards > len(spec.edges) / 2
    target = dp.LogitDiff(ANSWERS, WRONG)
    graph = depass.graph(clean, target, attention="symmetric", contrast=corrupt)
    n = int(sum(spec.nodes[e.sender].kind != "bias" for e in spec.edges))
    budgets = budget_grid(n, points=8)
    assert budgets[0] == 1 and budgets[-1] == n
    curve = graph_curve(patcher, graph, budgets)
    assert curve.faithfulness[-1] == pytest.approx(1.0)
    assert curve.area == curve.area and curve.kept[-1] <= n  # finite (random models overshoot 1)
    curves = {"depass": curve, "acdc": acdc_curve(patcher, result), "same": curve}
    assert wins(curves, "depass", "same")["share"] == 1.0
    assert isinstance(figure({"m": curves}), go.Figure)
    circuit, value = smallest_circuit(graph, 0.8, patcher.faithfulness)
    assert value >= 0.8 and circuit.n_edges <= n


def test_plot_graph():
    model = graph_model("gpt2", torch.float64)
    graph = dp.DePass(model, attention="symmetric").graph(random_tokens(model), dp.Logit(3))
    fig = dp.plot.graph(graph, k=12)
    assert isinstance(fig, go.Figure)
    lines = [t for t in fig.data if t.mode == "lines" and t.x[0] is not None]
    assert len(lines) == 12
    circuit_fig = dp.plot.graph(graph.circuit(k=6))
    assert "circuit of" in circuit_fig.layout.title.text


def test_cli_graph_on_the_induction_model(tmp_path):
    from depass_lens.cli import main

    out = tmp_path / "circuit.html"
    assert main(["graph", "--model", "induction", "--n", "8", "--k", "12", "--out", str(out)]) == 0
    page = out.read_text()
    assert "Circuit" in page and "faithfulness" in page and "plotly-graph-div" in page
    data = json.loads(out.with_suffix(".json").read_text())
    patchable = [e for e in data["edges"] if not e["sender"].endswith(".b_O")]
    assert data["contrast"] and len(patchable) == 81  # 2 layers x 4 heads, attention-only
    assert out.with_suffix(".dot").read_text().startswith("digraph")
    assert zoo.list()  # the zoo stayed importable offline
