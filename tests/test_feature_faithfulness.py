"""Feature faithfulness by intervention: the spliced model, the protocols' endpoints and the
gradient baselines, on tiny random models.

Tolerances: the spliced model adds ``reconstruction + (real - reconstruction)``, a few rounded
sums of ``d_model`` products, so its logits match the model's to a few ``eps`` of their scale
(fp32 1e-5, fp64 1e-10); gradients are compared with hand-written ones in fp64 (1e-10).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from depass_lens.errors import DePassInputError
from depass_lens.evaluation.feature_faithfulness import (
    FeatureFaithfulness,
    Scores,
    ablation_agreement,
    evaluate,
    faithfulness_curves,
    graph_scores,
    reference_acts,
    total_shares,
)
from depass_lens.evaluation.feature_patching import (
    Patch,
    SplicedModel,
    attribution_patching,
    integrated_gradients,
)
from depass_lens.evaluation.metrics import logit_diff_metric
from tests.conftest import make_model, random_tokens
from tests.sae_helpers import make_sae

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ANSWERS, WRONG = torch.tensor([3, 5]), torch.tensor([7, 11])


def dictionaries(model, d_sae: int = 24, layers=None) -> list:
    """Transcoders on the MLPs (``hook_z`` SAEs on an attention-only model's layers)."""
    cfg = model.cfg
    layers = range(cfg.n_layers) if layers is None else layers
    if cfg.attn_only:
        return [make_sae(model, "z", layer=L, d_sae=d_sae, seed=L) for L in layers]
    out = [make_sae(model, "transcoder", layer=L, d_sae=d_sae, seed=L) for L in layers]
    if cfg.normalization_type is None:  # no ln2: the transcoder reads the MLP's input stream
        for L, tc in zip(layers, out):
            tc.hook_name = f"blocks.{L}.hook_resid_mid"
    return out


def batch(model):
    return random_tokens(model, batch=2, n_pos=7), random_tokens(model, batch=2, n_pos=7, seed=9)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["gpt2", "attn_only", "llama"])
def test_spliced_model_with_frozen_errors_reproduces_the_model(family, dtype):
    model = make_model(family, dtype)
    tokens, corrupted = batch(model)
    spliced = SplicedModel(model, dictionaries(model), tokens)
    with torch.no_grad():
        real = model(tokens)
        assert relative(spliced.run(), real) < TOL[dtype]
        # the latents are live: ablating one at the first site changes the logits
        first = spliced.names[0]
        acts = spliced.clean[first].acts
        assert float((acts != 0).float().mean()) > 0.1
        mask = torch.zeros_like(acts, dtype=torch.bool)
        mask[..., int(acts[0, -1].abs().argmax())] = True
        ablated = spliced.run({first: Patch(mask, torch.zeros_like(acts))})
        assert relative(ablated, real) > 1e3 * TOL[dtype]
        # the corrupted run's latents with their own errors reproduce the corrupted prompt
        other = spliced.record(corrupted)
        patches = {
            n: Patch(torch.ones_like(r.acts, dtype=torch.bool), r.acts) for n, r in other.items()
        }
        errors = {n: r.error for n, r in other.items()}
        rerun = spliced.run(patches, tokens=corrupted, errors=errors)
        assert relative(rerun, model(corrupted)) < TOL[dtype]


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_held_patterns_and_norm_scales_make_fixed_latents_act_additively(family):
    """``SplicedModel.run(hold=...)`` with every pattern and norm scale held at the values the
    all-corrupted run ``read``: every site's latents fixed, each path from them to the logits
    is linear, so two disjoint kept sets' effects add up exactly (fp64); the real model does
    not add them up (the check can fail), and holding a run's own values changes nothing."""
    model = make_model(family, torch.float64)
    tokens, corrupted = batch(model)
    spliced = SplicedModel(model, dictionaries(model), tokens)
    clean = {n: r.acts for n, r in spliced.clean.items()}
    reference = reference_acts(spliced, "corrupted", corrupted)
    gen = torch.Generator().manual_seed(3)
    coin = {n: torch.rand(a.shape, generator=gen) < 0.5 for n, a in clean.items()}

    def fixed(kept: dict[str, torch.Tensor]) -> dict[str, Patch]:
        return {
            n: Patch(torch.ones_like(a, dtype=torch.bool), torch.where(kept[n], a, reference[n]))
            for n, a in clean.items()
        }

    second = {n: ~c for n, c in coin.items()}
    both = {n: torch.ones_like(c) for n, c in coin.items()}
    none = {n: torch.zeros_like(c) for n, c in coin.items()}
    points = [n for n in spliced.adapter.hook_names() if n.endswith(("hook_pattern", "hook_scale"))]
    assert any(n.endswith("hook_pattern") for n in points) and "ln_final.hook_scale" in points
    state = dict.fromkeys(points, torch.empty(0))
    with torch.no_grad():
        base = spliced.run(fixed(none), read=state)
        assert all(state[n].numel() > 0 for n in points)
        again = spliced.run(fixed(none), hold=state)
        assert relative(again, base) < 1e-12

        def effect(kept: dict[str, torch.Tensor], hold: dict | None) -> torch.Tensor:
            return spliced.run(fixed(kept), hold=hold) - base

        for hold, additive in ((state, True), (None, False)):
            total = effect(both, hold)
            parts = effect(coin, hold) + effect(second, hold)
            gap = relative(parts, total)
            assert (gap < 1e-10) if additive else (gap > 1e-6), (hold is not None, gap)
    with pytest.raises(DePassInputError, match="no hook point"):
        spliced.run(hold={"blocks.0.attn.hook_nothing": torch.zeros(1)})
    with pytest.raises(DePassInputError, match="has shape"):
        spliced.run(hold={points[0]: state[points[0]][:1]})


@pytest.mark.numerics
@pytest.mark.parametrize("circuit", ["live", "fixed"])
def test_all_latents_clean_is_one_and_none_is_zero(circuit):
    model = make_model("gpt2", torch.float64)
    tokens, corrupted = batch(model)
    dicts = dictionaries(model)
    spliced = SplicedModel(model, dicts, tokens)
    metric = logit_diff_metric(ANSWERS, WRONG)
    reference = reference_acts(spliced, "corrupted", corrupted)
    gen = torch.Generator().manual_seed(0)
    noise = {
        n: torch.randn(r.acts.shape, generator=gen, dtype=r.acts.dtype)
        for n, r in spliced.clean.items()
    }
    scores = {"random": Scores(noise, noise)}
    n_all = sum(int((spliced.clean[n].acts != reference[n]).sum(dim=(1, 2)).max()) for n in noise)
    curves = faithfulness_curves(spliced, metric, scores, reference, [0, 1, n_all], circuit=circuit)
    values = curves.curves["random"].faithfulness
    assert values[0] == 0.0  # the harness's own endpoints, by construction up to rounding
    assert values[-1] == pytest.approx(1.0, abs=1e-12)
    assert 0 < abs(values[1]) < 10
    with torch.no_grad():  # the endpoints, independently: the clean model ...
        clean = float(metric(model(tokens)).mean())
        assert curves.endpoints["all"] == pytest.approx(clean, abs=1e-10)

        def corrupt_site(tc, name):  # ... and every site's latents at their corrupted values
            def hook(value, hook):
                return reference[name] @ tc.W_dec + tc.b_dec + spliced.clean[name].error

            return hook

        hooks = [(tc.hook_name_out, corrupt_site(tc, n)) for tc, n in zip(dicts, spliced.names)]
        with spliced.adapter.hooks(hooks):
            none = float(metric(model(tokens)).mean())
    assert curves.endpoints["none"] == pytest.approx(none, abs=1e-10)
    assert none != pytest.approx(clean, abs=1e-3)


def _ln_gradient(x: torch.Tensor, w: torch.Tensor, eps: float, v: torch.Tensor) -> torch.Tensor:
    """``d <LN(x), v> / dx`` for TransformerLens's LayerNorm ``w (x - mean) / scale + b``:
    ``(P - c c^T / (d s^2)) (w * v) / s`` with ``c = x - mean``, ``s = sqrt(mean(c^2) + eps)``."""
    d = x.shape[-1]
    c = x - x.mean()
    s = torch.sqrt((c * c).mean() + eps)
    u = w * v
    return ((u - u.mean()) - c * (c @ u) / (d * s * s)) / s


@pytest.mark.numerics
def test_attribution_patching_is_the_hand_computed_gradient_in_one_layer():
    model = make_model("gpt2", torch.float64, n_layers=1)
    tokens, corrupted = batch(model)
    (tc,) = dicts = dictionaries(model)
    spliced = SplicedModel(model, dicts, tokens)
    metric = logit_diff_metric(ANSWERS, WRONG)
    reference = reference_acts(spliced, "corrupted", corrupted)
    atp = attribution_patching(spliced, metric, reference)["L0.mlp"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    norm = spliced.adapter.final_norm()
    W_U = spliced.adapter.W_U
    clean, b = spliced.clean["L0.mlp"].acts, reference["L0.mlp"]
    for p in range(2):
        x = cache["blocks.0.hook_resid_post"][p, -1]
        g = _ln_gradient(x, norm.w, model.cfg.eps, W_U[:, ANSWERS[p]] - W_U[:, WRONG[p]])
        expected = (clean[p, -1] - b[p, -1]) * (tc.W_dec.detach() @ g)
        torch.testing.assert_close(atp[p, -1], expected, rtol=0, atol=1e-10)
        # one layer: a position's MLP output reaches only its own position's logits
        assert float(atp[p, :-1].abs().max()) == 0.0
    assert float(atp.abs().max()) > 1e-3


@pytest.mark.numerics
def test_integrated_gradients_are_exact_where_the_metric_is_linear_in_the_latents():
    """No norms, one transcoder on the last MLP: the logits are affine in its latents, so every
    number of steps gives the exact change, latent by latent equal to attribution patching."""
    model = make_model("no_norm", torch.float64)
    tokens, corrupted = batch(model)
    last = model.cfg.n_layers - 1
    spliced = SplicedModel(model, dictionaries(model, layers=[last]), tokens)
    metric = logit_diff_metric(ANSWERS, WRONG)
    name = spliced.names[0]
    for reference in ("zero", "corrupted"):
        ref = reference_acts(spliced, reference, corrupted)
        ig = integrated_gradients(spliced, metric, ref, steps=3)[name]
        torch.testing.assert_close(
            ig, attribution_patching(spliced, metric, ref)[name], rtol=0, atol=1e-10
        )
        with torch.no_grad():
            everything = torch.ones_like(ref[name], dtype=torch.bool)
            change = metric(spliced.run()) - metric(
                spliced.run({name: Patch(everything, ref[name])})
            )
        torch.testing.assert_close(ig.sum(dim=(1, 2)), change, rtol=0, atol=1e-10)
        assert float(change.abs().min()) > 1e-3


@pytest.mark.numerics
def test_integrated_gradients_converge_to_the_exact_change():
    """A smooth nonlinear path (layer-1 transcoder; attention, GELU and LayerNorm after it): the
    midpoint rule's error falls with the steps and vanishes in the limit (completeness)."""
    model = make_model("gpt2", torch.float64)
    tokens, corrupted = batch(model)
    spliced = SplicedModel(model, dictionaries(model, layers=[1]), tokens)
    metric = logit_diff_metric(ANSWERS, WRONG)
    ref = reference_acts(spliced, "corrupted", corrupted)
    name = spliced.names[0]
    with torch.no_grad():
        everything = torch.ones_like(ref[name], dtype=torch.bool)
        change = metric(spliced.run()) - metric(spliced.run({name: Patch(everything, ref[name])}))
    errors = []
    for steps in (1, 3, 12):
        ig = integrated_gradients(spliced, metric, ref, steps=steps)[name]
        errors.append(float((ig.sum(dim=(1, 2)) - change).abs().max()))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-3 * float(change.abs().max())


@pytest.mark.numerics
def test_graph_shares_predict_zero_ablation_exactly_where_the_model_is_linear():
    """No norms, the last MLP replaced: zeroing latents removes exactly their DePass shares, and
    the shares scaled by each latent's change predict the contrastive curve exactly."""
    model = make_model("no_norm", torch.float64)
    tokens, _ = batch(model)
    last = model.cfg.n_layers - 1
    spliced = SplicedModel(model, dictionaries(model, layers=[last]), tokens)
    metric = logit_diff_metric(ANSWERS, WRONG)
    g = graph_scores(spliced, ANSWERS, WRONG, ["depass-value"])["depass-value"]
    zero = reference_acts(spliced, "zero")
    scores = {"depass-value": Scores(g.shares, g.shares)}
    points = ablation_agreement(spliced, metric, scores, zero, [1, 3, 50])["depass-value"]
    for point in points:
        torch.testing.assert_close(
            torch.tensor(point.predicted), torch.tensor(point.measured), rtol=0, atol=1e-10
        )
    assert abs(points[-1].measured[0]) > 1e-3
    _, corrupted = batch(model)
    reference = reference_acts(spliced, "corrupted", corrupted)
    estimate = g.shares  # scaled by (a - a_corrupt) / a in method_scores; here by hand:
    for n, a in spliced.clean.items():
        safe = torch.where(a.acts != 0, a.acts, 1.0)
        estimate = {
            **estimate,
            n: torch.where(a.acts != 0, g.shares[n] * (a.acts - reference[n]) / safe, 0.0),
        }
    scores = {"depass-value": Scores(estimate, estimate)}
    for circuit in ("fixed", "live"):  # one site, no dictionary upstream: the two agree
        curves = faithfulness_curves(spliced, metric, scores, reference, [1, 3, 10], circuit)
        torch.testing.assert_close(
            torch.tensor(curves.predicted["depass-value"]),
            torch.tensor(curves.curves["depass-value"].faithfulness),
            rtol=0,
            atol=1e-10,
        )


@pytest.mark.numerics
def test_total_shares_conserve_the_target():
    """Passing each latent's total back to its senders keeps the sum: the source nodes' totals
    plus each latent's own bias's part (``b_enc / pre`` of its total) are the target."""
    import depass_lens as dp

    model = make_model("gpt2", torch.float64)
    tokens, _ = batch(model)
    graph = dp.DePass(model, progress=False).feature_graph(
        tokens[:1], dp.LogitDiff(3, 7), dictionaries=dictionaries(model), attention="value"
    )
    total = total_shares(graph)
    sources = torch.tensor([n.kind not in ("latent", "target") for n in graph.nodes])
    target = graph.targets[0]
    value = float(graph.value[target] - graph.own[target])
    rows = graph.receivers[graph.receivers != target]
    biases = float((graph.own[rows] / graph.value[rows] * total[rows]).sum())
    assert float(total[sources].sum()) + biases == pytest.approx(value, abs=1e-10)
    latents = torch.tensor([n.kind == "latent" for n in graph.nodes])
    direct = graph.target_scores()
    assert float((total - direct)[latents].abs().max()) > 1e-3  # later latents pass weight on


def test_evaluate_runs_every_method_and_serialises():
    model = make_model("gpt2", torch.float64, n_layers=2)
    tokens, corrupted = batch(model)
    result = evaluate(
        model,
        dictionaries(model, d_sae=16),
        tokens,
        corrupted,
        ANSWERS,
        WRONG,
        name="tiny",
        ablation_budgets=(1, 4),
        ig_steps=2,
    )
    assert set(result.ablation) == {"zero", "corrupted"}
    assert "depass-contrast" in result.ablation["corrupted"]
    assert "depass-contrast" not in result.ablation["zero"]
    for cs in result.curves.values():
        for curve in cs.curves.values():
            assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-12)
            assert all(math.isfinite(v) for v in curve.faithfulness)
        assert cs.endpoints["all"] == pytest.approx(cs.endpoints["clean"], abs=1e-10)
    again = FeatureFaithfulness.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.to_dict() == result.to_dict()
