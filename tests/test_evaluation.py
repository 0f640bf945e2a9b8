"""Evaluation baselines, protocols and agreement statistics, checked against hand computations.

Tiny random-weight models (float64, random biases), token tensors only: no tokenizer, no network.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from depass_lens import evaluation as ev
from depass_lens.evaluation import baselines as B
from depass_lens.evaluation.forward import residual_input
from tests.conftest import TL, native_bridge

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
VOCAB = 50


def make_model(seed: int = 0, init_range: float = 0.1, **overrides):
    config = dict(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_mlp=48,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        initializer_range=init_range,
        seed=seed,
        dtype=torch.float64,
    )
    config.update(overrides)
    if TL >= 4:  # the same config as a boot_native Bridge, biases and norm weights random
        return native_bridge(config, torch.float64)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**config))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random biases and norm weights, so no term is trivially zero
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b") or name.split(".")[-1] == "w":
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model.eval()


def random_tokens(batch: int, n_pos: int, seed: int) -> torch.Tensor:
    tokens = torch.randint(
        2, VOCAB - 4, (batch, n_pos), generator=torch.Generator().manual_seed(seed)
    )
    tokens[:, 0] = 1  # BOS
    return tokens


@pytest.fixture(autouse=True)
def no_grad():
    """Library code must turn gradients on itself where it needs them."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def batch() -> ev.TaskBatch:
    return ev.TaskBatch(
        random_tokens(4, 8, seed=5),
        torch.tensor([3, 4, 5, 6]),
        torch.tensor([7, 8, 9, 10]),
        random_tokens(4, 8, seed=6),
    )


def hook_replacing(index, value=None):
    def hook(act, hook):
        act = act.clone()
        act[:, :, index] = 0 if value is None else value
        return act

    return hook


# ------------------------------------------------------------------------------ metrics
def test_metrics_read_the_right_position():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    answers, wrong = torch.tensor([1, 2]), torch.tensor([3, 0])
    rows = torch.arange(2)
    torch.testing.assert_close(ev.logit_metric(answers)(logits), logits[rows, -1, answers])
    diff = ev.logit_diff_metric(answers, wrong, pos=1)(logits)
    torch.testing.assert_close(diff, logits[rows, 1, answers] - logits[rows, 1, wrong])
    probs = logits[rows, -1].softmax(-1)[rows, answers]
    torch.testing.assert_close(ev.prob_metric(answers)(logits), probs)
    # with right padding, -1 is the last real token; with left padding, 0 is the first real one
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    got = ev.logit_metric(answers, attention_mask=right)(logits)
    torch.testing.assert_close(got, torch.stack([logits[0, 1, 1], logits[1, 3, 2]]))
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    got = ev.logit_metric(answers, pos=0, attention_mask=left)(logits)
    torch.testing.assert_close(got, torch.stack([logits[0, 2, 1], logits[1, 0, 2]]))


# ----------------------------------------------------------------------------- agreement
def test_rank_statistics_on_hand_made_vectors():
    assert ev.rankdata(torch.tensor([10.0, 30, 20, 20])).tolist() == [1, 4, 2.5, 2.5]
    assert ev.spearman(
        torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 4, 9, 16])
    ) == pytest.approx(1)
    assert ev.spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1)
    # ties averaged: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> r = 4.5 / sqrt(4.5 * 5)
    rho = ev.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4]))
    assert rho == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(ev.spearman(torch.ones(3), torch.tensor([1.0, 2, 3])))
    scores, truth = torch.tensor([5.0, 4, -9, 0]), torch.tensor([3.0, 2, 1, 0])
    assert ev.precision_at_k(scores, truth, 2, by="signed") == 1.0
    assert ev.precision_at_k(scores, truth, 2, by="abs") == 0.5  # {2, 0} vs {0, 1}
    assert ev.precision_at_k(-truth, truth, 1, by="abs") == 1.0  # orientation-free
    stats = ev.agreement(torch.stack([truth, truth]), truth, ks=[1, 3], by="signed")
    assert stats["spearman"] == pytest.approx(1) and stats["precision@3"] == 1.0


def test_baseline_relative_subtracts_the_reference_mean():
    def share(tokens):  # a "share" with a constant offset of 5 per component
        return tokens.double()[:, :2] + 5

    tokens, reference = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 0], [2, 2]])
    relative = ev.baseline_relative(share, tokens, reference)
    torch.testing.assert_close(relative, torch.tensor([[0.0, 1], [2, 3]], dtype=torch.float64))
    paired = ev.baseline_relative(share, tokens, reference, paired=True)
    torch.testing.assert_close(paired, torch.tensor([[1.0, 2], [1, 2]], dtype=torch.float64))


# ------------------------------------------------------------------- component baselines
def test_exact_ablation_matches_a_manual_hook(model, batch):
    metric = batch.metric()
    clean = metric(model(batch.tokens))
    zero = B.exact_ablation(model, batch.tokens, metric, level="heads", progress=False)
    ablated = model.run_with_hooks(
        batch.tokens, fwd_hooks=[("blocks.1.attn.hook_z", hook_replacing(2))]
    )
    torch.testing.assert_close(zero[:, 1 * 4 + 2], metric(ablated) - clean)
    # mean-ablation of one neuron, the mean taken over the reference prompts and positions
    reference = batch.corrupted_tokens
    mean = B.exact_ablation(
        model, batch.tokens, metric, level=("neurons", 0), ablation="mean",
        reference_tokens=reference, batch_size=8, progress=False,
    )  # fmt: skip
    _, cache = model.run_with_cache(reference)
    value = cache["blocks.0.mlp.hook_post"][..., 17].mean()
    hook = ("blocks.0.mlp.hook_post", hook_replacing(17, value))
    torch.testing.assert_close(
        mean[:, 17], metric(model.run_with_hooks(batch.tokens, fwd_hooks=[hook])) - clean
    )
    assert mean.shape == (4, 48)


def test_attribution_patching_is_first_order_exact_patching():
    """Corrupted prompts whose token embedding differs by 1e-4: AtP's error is second order."""
    model = make_model(seed=3)
    tokens = random_tokens(4, 8, seed=7)
    corrupted = tokens.clone()
    corrupted[:, 3] = torch.arange(VOCAB - 4, VOCAB)  # near-duplicates of the clean tokens
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noise = torch.randn(4, 32, generator=gen, dtype=torch.float64)
        model.W_E[VOCAB - 4 :] = model.W_E[tokens[:, 3]] + 1e-4 * noise
    metric = ev.logit_diff_metric(torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8, 9, 10]))
    for level in ("heads", "neurons"):
        atp = B.attribution_patching(model, tokens, metric, level=level, corrupted_tokens=corrupted)
        exact = B.exact_ablation(
            model, tokens, metric, level=level, ablation="patch", corrupted_tokens=corrupted,
            progress=False,
        )  # fmt: skip
        scale = exact.abs().max()
        assert scale > 1e-6  # the perturbation has a first-order effect
        assert (atp - exact).abs().max() < 1e-3 * scale


def test_gradient_x_activation_is_its_definition(model, batch):
    metric = batch.metric()
    store = {}

    def keep(act, hook):
        store[hook.name] = act
        return act  # the tensor that flows on (a Bridge hook otherwise sees a detached view)

    with torch.enable_grad():
        hooks = [(f"blocks.{layer}.attn.hook_z", keep) for layer in range(2)]
        out = metric(model.run_with_hooks(batch.tokens, fwd_hooks=hooks)).sum()
        grads = torch.autograd.grad(out, [store[n] for n, _ in hooks])
    manual = torch.cat([(store[n] * g).sum((1, 3)) for (n, _), g in zip(hooks, grads)], 1)
    got = B.gradient_x_activation(model, batch.tokens, metric, level="heads")
    torch.testing.assert_close(got, manual.detach())


# ----------------------------------------------------------------------- token baselines
def test_gradient_x_input_matches_autograd_on_the_embedding_hooks(model, batch):
    metric = batch.metric()
    store = {}

    def leaf(value, hook):
        store[hook.name] = value.detach().requires_grad_(True)
        return store[hook.name]

    with torch.enable_grad():
        hooks = [("hook_embed", leaf), ("hook_pos_embed", leaf)]
        out = metric(model.run_with_hooks(batch.tokens, fwd_hooks=hooks)).sum()
        grad = torch.autograd.grad(out, store["hook_embed"])[0]
    embeddings = store["hook_embed"] + store["hook_pos_embed"]
    gxi = B.gradient_x_input(model, batch.tokens, metric)
    torch.testing.assert_close(gxi, (grad * embeddings).sum(-1).detach())
    torch.testing.assert_close(B.gradient_norm(model, batch.tokens, metric), grad.norm(dim=-1))


def test_integrated_gradients_completeness():
    """Scores sum to metric(input) - metric(zero input); on a norm-free model the path is smooth."""
    model = make_model(seed=2, init_range=0.2, normalization_type=None)
    tokens = random_tokens(3, 6, seed=8)
    metric = ev.logit_diff_metric(torch.tensor([3, 4, 5]), torch.tensor([7, 8, 9]))
    zero_input = torch.zeros_like(residual_input(model, tokens).resid)
    gap = metric(model(tokens)) - metric(model(zero_input, start_at_layer=0))
    assert gap.abs().min() > 0.05
    ig = B.integrated_gradients(model, tokens, metric, steps=16)  # Gauss-Legendre nodes
    torch.testing.assert_close(ig.sum(-1), gap, atol=1e-6, rtol=0)
    riemann = B.integrated_gradients(model, tokens, metric, steps=32, rule="midpoint")
    torch.testing.assert_close(riemann.sum(-1), gap, atol=1e-3, rtol=0)
    coarse = B.integrated_gradients(model, tokens, metric, steps=2, rule="midpoint")
    assert (coarse.sum(-1) - gap).abs().max() > 10 * (riemann.sum(-1) - gap).abs().max()


def test_attention_baselines(model, batch):
    metric = ev.logit_metric(batch.answer_ids, pos=5)
    _, cache = model.run_with_cache(batch.tokens)
    pattern = cache["blocks.1.attn.hook_pattern"].mean(1)[:, 5]
    torch.testing.assert_close(B.attention_weights(model, batch.tokens, metric), pattern)
    rollout = B.attention_rollout(model, batch.tokens, metric)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (rollout[:, 6:] == 0).all()  # causal: nothing after the read position


def test_random_baselines_are_seeded(model, batch):
    metric = batch.metric()
    a = B.random_tokens(model, batch.tokens, metric, seed=3)
    assert torch.equal(a, B.random_tokens(model, batch.tokens, metric, seed=3))
    assert not torch.equal(a, B.random_tokens(model, batch.tokens, metric, seed=4))
    c = B.random_components(model, batch.tokens, metric, level="heads")
    assert torch.equal(c, B.random_components(model, batch.tokens, metric, level="heads"))
    assert c.shape == (4, 8)


def test_occlusion_is_leave_one_out(model, batch):
    metric = batch.metric()
    scores = B.occlusion(model, batch.tokens, metric)
    masked = batch.tokens.clone()
    masked[:, 3] = 0
    expected = metric(model(batch.tokens)) - metric(model(masked))
    torch.testing.assert_close(scores[:, 3], expected)
    # BOS and the query are protected: clean minus an unmasked run, zero up to fp64 rounding
    assert bool((scores[:, [0, -1]].abs() <= 1e-10 * expected.abs().max()).all())


def test_padding_changes_nothing(model):
    """A left- or right-padded prompt scores like the same prompt alone."""
    prompt = random_tokens(1, 6, seed=9)
    metric = ev.logit_diff_metric(torch.tensor([3]), torch.tensor([7]))
    alone = B.exact_ablation(model, prompt, metric, level="heads", progress=False)
    gxi = B.gradient_x_input(model, prompt, metric)
    pad = torch.zeros(1, 2, dtype=torch.long)
    for tokens, mask in [
        (torch.cat([pad, prompt], 1), torch.tensor([[0, 0] + [1] * 6])),
        (torch.cat([prompt, pad], 1), torch.tensor([[1] * 6 + [0, 0]])),
    ]:
        padded = B.exact_ablation(
            model, tokens, metric, level="heads", attention_mask=mask, progress=False
        )
        torch.testing.assert_close(padded, alone)
        got = B.gradient_x_input(model, tokens, metric, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], gxi[0])


# ------------------------------------------------------------------------- token protocols
@pytest.mark.parametrize("masking", ["replace", "zero", "drop"])
def test_disrupt_and_recover_end_points(model, batch, masking):
    metric = batch.metric()
    scores = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(0))
    disrupt = ev.disrupt_top(model, batch.tokens, scores, metric=metric, masking=masking)
    recover = ev.recover_top(model, batch.tokens, scores, metric=metric, masking=masking)
    clean = float(metric(model(batch.tokens)).mean())
    # BOS and the query (last) token are kept; everything else is masked
    if masking == "replace":
        full = batch.tokens.clone()
        full[:, 1:-1] = 0  # the fill id without a tokenizer
        masked = metric(model(full))
    elif masking == "zero":
        keep = torch.zeros(1, 8, 1, dtype=torch.float64)
        keep[:, [0, -1]] = 1
        hook = ("hook_embed", lambda v, hook: v * keep)
        masked = metric(model.run_with_hooks(batch.tokens, fwd_hooks=[hook]))
    else:
        masked = metric(model(batch.tokens[:, [0, -1]]))
    for curve in (disrupt, recover):
        assert curve.grid == [i / 10 for i in range(11)]
        assert set(curve.values) == {"prob", "logit", "accuracy", "metric"}
        assert set(curve.areas) == set(curve.values)
    assert disrupt.values["metric"][0] == pytest.approx(clean)
    assert disrupt.values["accuracy"][0] == 1.0
    assert disrupt.values["metric"][-1] == pytest.approx(float(masked.mean()))
    assert recover.values["metric"][0] == pytest.approx(float(masked.mean()))
    assert recover.values["metric"][-1] == pytest.approx(clean)
    # area of a curve by the trapezoid rule on [0, 1]
    v = disrupt.values["prob"]
    assert disrupt.areas["prob"] == pytest.approx(0.1 * (sum(v) - (v[0] + v[-1]) / 2))
    json.dumps(disrupt.to_dict())


def test_disrupt_masks_the_top_tokens(model, batch):
    """At 1/6 of the maskable tokens (one per prompt), Disrupt-top replaces the top-scored one."""
    scores = torch.zeros(4, 8)
    scores[:, 4] = 1.0
    curve = ev.disrupt_top(model, batch.tokens, scores, metric=batch.metric(), grid=[1 / 6])
    masked = batch.tokens.clone()
    masked[:, 4] = 0
    assert curve.values["metric"][0] == pytest.approx(float(batch.metric()(model(masked)).mean()))


# --------------------------------------------------------------------- component protocols
def test_component_curve_end_points_and_ranking(model, batch):
    metric = batch.metric()
    effects = B.exact_ablation(model, batch.tokens, metric, level="heads", progress=False)
    curve = ev.component_masking_curve(
        model, batch.tokens, -effects, metric, level="heads", which="top", ablation="zero"
    )
    assert curve.info["ks"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert curve.values["metric"][0] == pytest.approx(float(metric(model(batch.tokens)).mean()))
    everything = [(f"blocks.{layer}.attn.hook_z", lambda v, hook: 0 * v) for layer in range(2)]
    all_ablated = float(metric(model.run_with_hooks(batch.tokens, fwd_hooks=everything)).mean())
    assert curve.values["metric"][-1] == pytest.approx(all_ablated)
    # k = 1: the head with the most negative mean effect goes first
    top = int(effects.mean(0).argmin())
    hook = (f"blocks.{top // 4}.attn.hook_z", hook_replacing(top % 4))
    one = float(metric(model.run_with_hooks(batch.tokens, fwd_hooks=[hook])).mean())
    assert curve.values["metric"][1] == pytest.approx(one)


def test_per_example_ranking_ablates_each_prompts_own_top(model, batch):
    metric = batch.metric()
    scores = torch.zeros(4, 8)
    scores[torch.arange(4), torch.tensor([0, 5, 2, 7])] = 1.0  # a different top head per prompt
    curve = ev.component_masking_curve(
        model, batch.tokens, scores, metric, level="heads", ablation="zero", ks=[1],
        rank="per_example",
    )  # fmt: skip
    values = []
    for row, head in enumerate([0, 5, 2, 7]):
        hook = (f"blocks.{head // 4}.attn.hook_z", hook_replacing(head % 4))
        logits = model.run_with_hooks(batch.tokens[row : row + 1], fwd_hooks=[hook])
        values.append(ev.logit_diff_metric(batch.answer_ids[row], batch.wrong_ids[row])(logits))
    assert curve.values["metric"][0] == pytest.approx(float(torch.cat(values).mean()))


def test_neuron_curves_cover_top_and_bottom(model, batch):
    metric = batch.metric()
    scores = B.gradient_x_activation(model, batch.tokens, metric, level=("neurons", 1))
    curves = ev.component_curves(
        model, batch.tokens, scores, metric, level=("neurons", 1), ks=[0, 12, 48]
    )
    assert set(curves) == {
        "top-k zero-ablation", "bottom-k zero-ablation", "top-k mean-ablation",
        "bottom-k mean-ablation",
    }  # fmt: skip
    top, bottom = curves["top-k zero-ablation"], curves["bottom-k zero-ablation"]
    assert top.grid == [0, 0.25, 1]
    assert top.values["metric"][0] == pytest.approx(bottom.values["metric"][0], rel=1e-10)
    assert top.values["metric"][-1] == pytest.approx(bottom.values["metric"][-1])


# ------------------------------------------------------------------------------ subspace
def test_probe_protocol(model, batch):
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = ev.Probe("blocks.0.hook_resid_post", direction, pos=-1)
    _, cache = model.run_with_cache(batch.tokens)
    manual = cache["blocks.0.hook_resid_post"][:, -1] @ direction
    torch.testing.assert_close(ev.probe_reading(model, batch.tokens, probe), manual)
    rankings = {
        name: ev.SUBSPACE_METHODS[name](model, batch.tokens, probe)
        for name in ("grad-x-input", "random")
    }
    curves = ev.compare_probe_rankings(model, batch.tokens, rankings, probe, masking="zero")
    for curve in curves.values():
        assert curve.values["change"][0] <= 1e-10 * float(manual.abs().mean())  # two fp64 runs
        assert curve.values["reading"][0] == pytest.approx(float(manual.mean()))
    everything = [curves[name].values["change"][-1] for name in ("grad-x-input", "random")]
    assert everything[0] == pytest.approx(everything[1], rel=1e-10)  # the same run, twice


# -------------------------------------------------------------------------------- runner
def test_ranking_by_the_truth_is_perfect(model, batch):
    truth = B.exact_ablation(model, batch.tokens, batch.metric(), level="heads", progress=False)
    ev.register_component_method("oracle", lambda *a, **k: truth, sign=-1)
    try:
        report = ev.evaluate(
            model, batch, "heads", ["oracle", "random"], ground_truth=truth, agreement_ks=[1, 3],
            ablations=("zero",), progress=False,
        )  # fmt: skip
    finally:
        del ev.COMPONENT_METHODS["oracle"]
    oracle = report.methods["oracle"].agreement
    assert oracle["precision@1"] == oracle["precision@3"] == oracle["precision@3 (abs)"] == 1.0
    assert oracle["spearman"] == pytest.approx(1.0)


def test_token_agreement_with_occlusion(model, batch):
    report = ev.evaluate(
        model, batch, "tokens", ["occlusion", "grad-x-input"], ground_truth="occlusion",
        grid=[0, 0.5, 1], progress=False,
    )  # fmt: skip
    assert report.methods["occlusion"].agreement["precision@3"] == 1.0
    assert report.methods["occlusion"].agreement["spearman"] == pytest.approx(1.0)
    assert report.curves["occlusion"]["disrupt"].grid == [0, 0.5, 1]


def test_evaluate_writes_reports(model, batch, tmp_path):
    heads = ev.evaluate(
        model, batch, "heads", ["attribution-patching", "grad-x-activation", "depass-taylor"],
        ground_truth="ablation-mean", component_ks=[0, 4, 8], progress=False,
    )  # fmt: skip
    for name, result in heads.methods.items():
        assert result.skipped is None and result.seconds > 0, name
        assert len(result.curves) == 4 and "spearman" in result.agreement
    html = heads.to_html(tmp_path / "heads.html").read_text()
    assert "Plotly" in html and "<script src=" not in html  # plotly.js inlined: works offline
    data = json.loads(heads.to_json(tmp_path / "heads.json").read_text())
    assert set(data["methods"]) == set(heads.methods)
    assert "depass-taylor" in heads.markdown()
    # a batch without corrupted prompts: AtP is skipped (not an error) when running all methods
    plain = ev.TaskBatch(batch.tokens, batch.answer_ids)
    tokens = ev.evaluate(model, plain, "tokens", ["grad-x-input", "random"], progress=False)
    assert set(tokens.curves["random"]) == {"disrupt", "recover"}
    assert tokens.curves["random"]["disrupt"].values["accuracy"][0] == 1.0
    every = ev.evaluate(
        model, plain, "heads", ablations=("zero",), component_ks=[0, 8], progress=False
    )
    assert set(every.methods) == set(ev.COMPONENT_METHODS)
    skipped = {name for name, result in every.methods.items() if result.skipped}
    assert skipped == {"attribution-patching", "activation-patching", "depass-taylor-relative"}
    with pytest.raises(ValueError, match="corrupted"):
        ev.evaluate(model, plain, "heads", ["attribution-patching"], progress=False)
