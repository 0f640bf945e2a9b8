"""Feature graphs: exactness on every family, agreement with independent paths, the check's power,
batching and budget invariance, and clear errors.

Tolerances: each check compares a sum of edges and constants (from gradients of the replacement
model) with a pre-activation read from the model's own forward pass; both are sums of
O(d_model * n_layers) rounded products, so the gap is a few ``eps`` of the row's absolute sum:
fp64 1e-10, fp32 1e-5 (:func:`depass_lens.decomposition.tolerance`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import depass_lens as dp
from depass_lens.errors import DePassInputError, LosslessnessError, UnsupportedModelError
from depass_lens.sae import SAELatent, SAELatents
from tests.conftest import TL, make_model, random_tokens
from tests.sae_helpers import make_sae

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def dictionaries(model, d_sae: int = 24) -> list:
    """A transcoder on every MLP (z SAEs on every layer of an attention-only model)."""
    cfg = model.cfg
    if cfg.attn_only:
        return [make_sae(model, "z", layer=L, d_sae=d_sae, seed=L) for L in range(cfg.n_layers)]
    out = [make_sae(model, "transcoder", layer=L, d_sae=d_sae, seed=L) for L in range(cfg.n_layers)]
    if cfg.normalization_type is None:  # no ln2: the transcoder reads the MLP's input stream
        for L, tc in enumerate(out):
            tc.hook_name = f"blocks.{L}.hook_resid_mid"
    return out


def split_for(model) -> str:
    return "value" if dp.DePass(model, attention="value").adapter.qk_problems() else "symmetric"


def prompt(model, n_pos: int = 7):
    return random_tokens(model, batch=1, n_pos=n_pos)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_on_every_family(family, dtype):
    model = make_model(family, dtype)
    depass = dp.DePass(model, attention="value", progress=False)
    attention = split_for(model)
    kinds = dtype == torch.float64  # the path classes' sums are checked once, in fp64
    graph = depass.feature_graph(
        prompt(model),
        dp.Logit(3),
        dictionaries=dictionaries(model),
        attention=attention,
        edge_kinds=kinds,
    )
    gaps = graph.check()
    assert gaps["latents"] < TOL[dtype] and gaps["targets"] < TOL[dtype], gaps
    n_latents = sum(n.kind == "latent" for n in graph.nodes)
    assert n_latents > 10  # the dictionaries are active: the check is about something
    assert len(graph.receivers) == n_latents + 1
    if attention != "value" and kinds:
        assert set(graph.kind_edges) == {"value", "query", "key"}
        assert gaps["kinds"] < TOL[dtype]
        assert float(graph.kind_edges["key"].abs().max()) > 0  # patterns do move


@pytest.mark.numerics
@pytest.mark.parametrize("attention", ["value", "symmetric"])
def test_latent_edges_equal_forward_mode_attribution(attention):
    """Edges from layer-0 transcoder latents (and their error and b_dec) into one layer-1 latent
    equal forward-mode DePass with the same latents as source and that latent as target: no MLP
    lies between them, so both explain the same linear map by independent code."""
    model = make_model("gpt2", torch.float64)
    tokens = prompt(model)
    tc0, tc1 = (make_sae(model, "transcoder", layer=L, d_sae=24, seed=L) for L in (0, 1))
    depass = dp.DePass(model, attention=attention, progress=False)
    graph = depass.feature_graph(tokens, dp.Logit(3), dictionaries=[tc0, tc1], edge_kinds=False)
    receivers = [i for i in graph.receivers.tolist() if graph.nodes[i].site == "L1.mlp"]
    node = graph.nodes[receivers[len(receivers) // 2]]
    reference = depass.attribute(
        tokens,
        SAELatent(tc1, node.index, pos=node.pos),
        SAELatents(tc0, by_position=True),
        mode="forward",
    )
    scores = reference.scores[0, 0]
    by_label = {
        (label.kind, getattr(label, "index", None), getattr(label, "pos", None)): float(score)
        for label, score in zip(reference.labels, scores)
    }
    incoming = graph.incoming(node.name)
    compared = 0
    for j, n in enumerate(graph.nodes):
        if n.site == "L0.mlp" and n.kind == "latent":
            assert float(incoming[j]) == pytest.approx(
                by_label[("latent", n.index, n.pos)], abs=1e-10
            )
            compared += 1
    assert compared > 5
    errors = [j for j, n in enumerate(graph.nodes) if n.site == "L0.mlp" and n.kind == "error"]
    error_total = by_label[("sae_error", None, None)]
    assert float(incoming[errors].sum()) == pytest.approx(error_total, abs=1e-10)


@pytest.mark.numerics
def test_last_site_edges_into_a_logit_are_direct_logit_attribution():
    """Value mode, the last layer's latents into a logit: ``a W_dec`` through the frozen final
    LayerNorm (centred, divided by TransformerLens's cached scale, times ``w``) and ``W_U``."""
    model = make_model("gpt2", torch.float64)
    if TL >= 4:
        pytest.skip("reads HookedTransformer's ln_final weights directly")
    tokens = prompt(model)
    tcs = dictionaries(model)
    graph = dp.DePass(model, attention="value", progress=False).feature_graph(
        tokens, dp.Logit(3), dictionaries=tcs
    )
    _, cache = model.run_with_cache(tokens)
    scale = cache["ln_final.hook_scale"][0, -1]
    readout = model.ln_final.w * model.W_U[:, 3]
    scores = graph.target_scores()
    checked = 0
    for j, node in enumerate(graph.nodes):
        if node.site == "L2.mlp" and node.kind == "latent" and node.pos == tokens.shape[1] - 1:
            out = graph.activation[j] * tcs[2].W_dec[node.index].detach()
            expected = ((out - out.mean()) / scale) @ readout.detach()
            assert float(scores[j]) == pytest.approx(float(expected), abs=1e-10)
            checked += 1
        elif node.site == "L2.mlp" and node.kind == "latent":
            assert float(scores[j]) == 0.0  # another position: no attention after the last MLP
    assert checked > 3


def _drop_position_nodes(monkeypatch):
    from depass_lens.features import build

    init = build.ReplacementRun.__init__

    def without_positions(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.embeddings = [h for h in self.embeddings if h != "hook_pos_embed"]

    monkeypatch.setattr(build.ReplacementRun, "__init__", without_positions)


def _drop_output_bias(monkeypatch):
    from depass_lens.adjoint import Linearisation

    hooks = Linearisation._attention_constant_hooks

    def without_b_O(self, layer):
        return [h for h in hooks(self, layer) if not h[0].endswith("hook_attn_out")]

    monkeypatch.setattr(Linearisation, "_attention_constant_hooks", without_b_O)


def _drop_one_head_ov(monkeypatch):
    from depass_lens.features import replacement

    hooks = replacement.Replacement.hooks

    def head_zero_detached(v, hook):
        return torch.cat([v[:, :, :1].detach(), v[:, :, 1:]], dim=2)

    def with_cut(self):
        return [*hooks(self), ("blocks.0.attn.hook_v", head_zero_detached)]

    monkeypatch.setattr(replacement.Replacement, "hooks", with_cut)


@pytest.mark.parametrize("remove", [_drop_position_nodes, _drop_output_bias, _drop_one_head_ov])
def test_a_missing_path_fails_the_check(monkeypatch, remove):
    model = make_model("gpt2", torch.float64)
    depass = dp.DePass(model, attention="value", progress=False)
    tokens, tcs = prompt(model), dictionaries(model)
    assert max(depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs).check().values()) < 1e-10
    remove(monkeypatch)
    with pytest.raises(LosslessnessError, match="not exact"):
        depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs)


@pytest.mark.numerics
def test_batching_and_node_budget_change_nothing_but_what_is_computed():
    model = make_model("gpt2", torch.float64)
    depass = dp.DePass(model, attention="symmetric", progress=False)
    tokens, tcs = prompt(model), dictionaries(model)
    full = depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs)
    one = depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs, batch_size=1)
    torch.testing.assert_close(one.edges, full.edges, rtol=0, atol=1e-12)
    for kind in full.kind_edges:
        torch.testing.assert_close(one.kind_edges[kind], full.kind_edges[kind], rtol=0, atol=1e-12)
    budget = depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs, max_feature_nodes=5)
    assert len(budget.receivers) == 6
    strongest = full.target_scores().abs()
    latent = torch.tensor([n.kind == "latent" for n in full.nodes])
    top5 = set(torch.where(latent, strongest, -1.0).topk(5).indices.tolist())
    assert set(budget.receivers[1:].tolist()) == top5  # influence so far = |edge into target|
    for r, node in enumerate(budget.receivers.tolist()):
        torch.testing.assert_close(budget.edges[r], full.incoming(node), rtol=0, atol=1e-12)


def test_first_position_left_out_is_still_exact():
    model = make_model("gpt2", torch.float64)
    depass = dp.DePass(model, attention="value", progress=False)
    graph = depass.feature_graph(
        prompt(model), dp.Logit(3), dictionaries=dictionaries(model), zero_first_position=True
    )
    assert not any(n.kind == "latent" and n.pos == 0 for n in graph.nodes)
    assert max(graph.check().values()) < 1e-10


def test_clear_errors():
    model = make_model("gpt2", torch.float32)
    depass = dp.DePass(model, attention="value", progress=False)
    tokens, tcs = prompt(model), dictionaries(model)
    wide = make_sae(model, "transcoder", layer=0)
    wide.W_enc = torch.nn.Parameter(torch.zeros(model.cfg.d_model + 1, 40))
    cases = [
        ([wide], "W_enc must be|width"),
        ([tcs[0], make_sae(model, "transcoder", layer=0, seed=5)], "both write"),
        ([make_sae(model, "resid_post", layer=7)], "does not have"),
        ([], "at least one dictionary"),
    ]
    for dicts, message in cases:
        with pytest.raises(DePassInputError, match=message):
            depass.feature_graph(tokens, dp.Logit(3), dictionaries=dicts)
    broken = make_sae(model, "transcoder", layer=1)
    with torch.no_grad():
        broken.W_dec[0, 0] = float("nan")
    with pytest.raises(DePassInputError, match="NaN"):
        depass.feature_graph(tokens, dp.Logit(3), dictionaries=[broken])
    with pytest.raises(DePassInputError, match="linear MLP rule"):
        depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs, rule="relu")
    with pytest.raises(DePassInputError, match="one prompt"):
        depass.feature_graph(random_tokens(model, 2), dp.Logit(3), dictionaries=tcs)
    graph = depass.feature_graph(tokens, dp.Logit(3), dictionaries=tcs)
    node = next(n for n in graph.nodes if n.kind == "latent")
    assert graph.latent(node.site, node.index, node.pos) == graph.index(node.name)
    for site, index, pos, message in [
        ("L9.mlp", 0, 0, "no dictionary"),
        (node.site, 10_000, node.pos, "not a latent"),
        (node.site, node.index, 99, "outside the prompt"),
    ]:
        with pytest.raises(DePassInputError, match=message):
            graph.latent(site, index, pos)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["gpt2", "llama", "attn_only"])
def test_contrastive_graph_explains_the_change_exactly(family):
    model = make_model(family, torch.float64)
    depass = dp.DePass(model, attention="value", progress=False)
    clean, corrupt = prompt(model), random_tokens(model, batch=1, n_pos=7, seed=9)
    if TL >= 4 and family == "llama":  # the bridge's rotary attention fires no post-rotary hook
        with pytest.raises(UnsupportedModelError, match="difference linearisation"):
            depass.feature_graph(
                clean, dp.Logit(3), dictionaries=dictionaries(model), contrast=corrupt
            )
        return
    graph = depass.feature_graph(
        clean, dp.Logit(3), dictionaries=dictionaries(model), contrast=corrupt
    )
    assert graph.attention == "difference"
    gaps = graph.check()
    assert max(gaps.values()) < 1e-10, gaps
    with torch.no_grad():
        change = model(clean)[0, -1, 3] - model(corrupt)[0, -1, 3]
    target = graph.targets[0]
    assert float(graph.value[target]) == pytest.approx(float(change), abs=1e-10)
    assert float(graph.target_scores().sum()) == pytest.approx(float(change), abs=1e-10)
    constants = [i for i, n in enumerate(graph.nodes) if n.name.endswith("b_dec")]
    assert float(graph.edges[:, constants].abs().max()) == 0.0  # equal in both runs
    assert float(graph.kind_edges["key"].abs().max()) > 0  # the pattern moves between runs


@pytest.mark.numerics
def test_mixed_sites_and_a_skip_transcoder_are_exact():
    """A skip transcoder (its ``W_skip x`` a path, not a node), a residual SAE, an
    attention-output SAE and a ``hook_z`` SAE in one model: exact, and the skip path carries
    edges from before the transcoder to after it."""
    model = make_model("gpt2", torch.float64)
    skip = make_sae(model, "transcoder", layer=0, seed=3)
    skip.W_skip = torch.nn.Parameter(
        0.3 * torch.randn(model.cfg.d_model, model.cfg.d_model, dtype=torch.float64)
    )
    sites = [
        skip,
        make_sae(model, "resid_post", layer=1, seed=4),
        make_sae(model, "z", layer=2, seed=5),
        make_sae(model, "attn_out", layer=2, seed=6),
    ]
    depass = dp.DePass(model, attention="symmetric", progress=False)
    graph = depass.feature_graph(prompt(model), dp.Logit(3), dictionaries=sites)
    assert max(graph.check().values()) < 1e-10
    assert {n.site for n in graph.nodes if n.kind == "latent"} == {
        "L0.mlp",
        "L1.resid_post",
        "L2.z",
        "L2.attn_out",
    }
    # the skip path is needed: a replacement that drops it leaves the graph inexact
    from depass_lens.features import replacement

    def no_skip(site, state):
        view = dataclasses.replace(site.view, W_skip=None)
        return original(dataclasses.replace(site, view=view), state)

    original = replacement.Replacement._replace_output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replacement.Replacement, "_replace_output", staticmethod(no_skip))
        with pytest.raises(LosslessnessError):
            depass.feature_graph(prompt(model), dp.Logit(3), dictionaries=sites)
