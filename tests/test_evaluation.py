"""Evaluation baselines and protocols check numbers, on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from depass_lens.evaluation import (
    COMPONENT_METHODS,
    TOKEN_METHODS,
    TaskBatch,
    baselines,
    component_curves,
    evaluate,
    precision_at_k,
    spearman,
    token_curves,
)
from tests.conftest import make_model, random_tokens


@pytest.fixture(scope="module")
def setup():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=4, n_pos=8, seed=5)
    corrupted = random_tokens(model, batch=4, n_pos=8, seed=6)
    batch = TaskBatch(tokens, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]), corrupted)
    return model, batch


def test_rank_statistics_on_hand_made_vectors():
    assert spearman(
        torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])
    ) == pytest.approx(1)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1)
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 1, 2])) == pytest.approx(1)
    scores, truth = torch.tensor([5.0, 4, -9, 0]), torch.tensor([3.0, 2, 1, 0])
    assert precision_at_k(scores, truth, 2) == 1.0
    assert precision_at_k(scores, truth, 2, by="abs") == 0.5


def test_exact_ablation_matches_a_manual_hook(setup):
    model, batch = setup
    scores = baselines.exact_ablation(model, batch, "heads", kind="zero")

    def zero_head(value, hook):
        value = value.clone()
        value[:, :, 2] = 0
        return value

    clean = batch.metric(model(batch.tokens))
    ablated = batch.metric(
        model.run_with_hooks(batch.tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    )
    torch.testing.assert_close(scores[:, 1 * model.cfg.n_heads + 2], (clean - ablated).detach())


def test_gradient_x_input_and_integrated_gradients(setup):
    model, batch = setup
    gxi = baselines.gradient_x_input(model, batch)
    embed = model.embed(batch.tokens) + model.pos_embed(batch.tokens)
    embed = embed.detach().requires_grad_(True)
    metric = batch.metric(model(embed, start_at_layer=0)).sum()
    (grad,) = torch.autograd.grad(metric, embed)
    torch.testing.assert_close(gxi, (grad * embed).sum(-1).detach())
    # completeness: IG sums to metric(input) - metric(zero input). On a model without norms the
    # path is smooth (a LayerNorm jumps near the zero input, which any Riemann sum misses).
    smooth = make_model("no_norm", torch.float64)
    ig = baselines.integrated_gradients(smooth, batch, steps=64)
    zeros = torch.zeros(*batch.tokens.shape, smooth.cfg.d_model, dtype=torch.float64)
    zero = batch.metric(smooth(zeros, start_at_layer=0))
    clean = batch.metric(smooth(batch.tokens))
    torch.testing.assert_close(ig.sum(-1), (clean - zero).detach(), rtol=1e-2, atol=1e-2)


def test_attribution_patching_is_grad_times_difference(setup):
    model, batch = setup
    atp = baselines.attribution_patching(model, batch, "neurons")
    acts, grad = baselines._acts_and_grads(model, batch.tokens, batch, "neurons", grads=True)
    corrupt, _ = baselines._acts_and_grads(model, batch.corrupted, batch, "neurons", grads=False)
    torch.testing.assert_close(atp, ((acts - corrupt) * grad).sum((1, 3)))
    assert atp.shape == (4, model.cfg.n_layers * model.cfg.d_mlp)


def test_token_curves_end_points(setup):
    model, batch = setup
    scores = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(0))
    disrupt = token_curves(model, batch, scores, mode="disrupt")
    recover = token_curves(model, batch, scores, mode="recover")
    clean = model(batch.tokens)[:, -1].softmax(-1)
    original = clean.argmax(-1)
    clean_prob = float(clean[torch.arange(4), original].mean())
    assert disrupt.values["prob"][0] == pytest.approx(clean_prob)  # nothing masked
    assert recover.values["prob"][-1] == pytest.approx(clean_prob)  # everything kept
    assert disrupt.values["prob"][-1] == pytest.approx(recover.values["prob"][0])  # all masked
    assert disrupt.values["kept"][0] == 1.0


def test_ranking_by_the_truth_is_perfect(setup):
    model, batch = setup
    truth = baselines.exact_ablation(model, batch, "heads")
    mean = truth.mean(0)
    k = 4
    assert precision_at_k(mean, mean, k) == 1.0
    curve = component_curves(model, batch, truth, "heads", which="top", kind="mean", ks=[0, 1])
    assert curve.values["metric"][0] == pytest.approx(1.0)


def test_random_baselines_are_seeded(setup):
    model, batch = setup
    assert torch.equal(baselines.random_tokens(model, batch), baselines.random_tokens(model, batch))
    assert torch.equal(
        baselines.random_components(model, batch, "heads"),
        baselines.random_components(model, batch, "heads"),
    )


def test_evaluate_runs_every_method(setup, tmp_path):
    model, batch = setup
    heads = evaluate(model, batch, "heads", ground_truth={"heads_mean": [[0.0] * 4] * 3})
    assert set(heads.methods) == set(COMPONENT_METHODS)
    assert "spearman" in heads.methods["depass-taylor"]["agreement"]
    tokens = evaluate(model, batch, "tokens", methods=["depass-taylor", "random"])
    assert set(tokens.curves["random"]) == {"disrupt", "recover"}
    assert tokens.to_html(tmp_path / "t.html").exists() and "depass-taylor" in tokens.markdown()
    assert set(TOKEN_METHODS) >= {"attention", "attention-rollout", "integrated-gradients"}
