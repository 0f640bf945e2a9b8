"""Independent paths agree: adjoint vs forward mode, DePass vs TransformerLens's own DLA."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.decomposition import tolerance
from tests.conftest import AGREEMENT, FAMILIES, make_model, random_tokens

pytestmark = pytest.mark.numerics  # also run under test.sh's second math configuration


def _sources(model):
    last = model.cfg.n_layers - 1
    sources = {
        "tokens": dp.Tokens(),
        "tokens_sep": dp.Tokens(pos_embed="separate"),
        "tokens_L1": dp.Tokens(layer=1),
        "heads": dp.Heads(),
        "modules": dp.Modules(),
        "modules_attn": dp.Modules(1, module="attn"),
        "subspace": dp.Subspace(
            1, torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
        ),
    }
    if not model.cfg.attn_only and not model.cfg.num_experts:
        sources["neurons"] = dp.Neurons(layer=[0, last])
    if not model.cfg.attn_only:
        sources["modules_mlp"] = dp.Modules([0, last], module="mlp")
    return sources


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adjoint_equals_forward(family, dtype):
    """Standing test: adjoint == forward (relative to the largest score) to the dtype's
    tolerance, every source, two targets."""
    model = make_model(family, dtype)
    tokens = random_tokens(model, batch=2)
    depass = dp.DePass(model)
    targets = [dp.Logit(5), dp.LogitDiff(7, 11, pos=-2)]
    for name, source in _sources(model).items():
        forward = depass.attribute(tokens, targets, source, mode="forward")
        adjoint = depass.attribute(tokens, targets, source, mode="adjoint")
        assert forward.scores.shape == adjoint.scores.shape
        assert [str(x) for x in forward.labels] == [str(x) for x in adjoint.labels]
        gap = _relative_gap(adjoint.scores, forward.scores)
        assert gap <= AGREEMENT[dtype], (name, gap)
        assert forward.completeness_error() <= tolerance(dtype), name
        assert adjoint.completeness_error() <= tolerance(dtype), name


@pytest.mark.parametrize("side", ["gate", "up", "symmetric"])
def test_adjoint_equals_forward_gated_sides(side):
    model = make_model("llama", torch.float64)
    tokens = random_tokens(model)
    depass = dp.DePass(model, rule=dp.TaylorRule(side=side))
    for source in (dp.Tokens(), dp.Heads(), dp.Neurons()):
        forward = depass.attribute(tokens, dp.Logit(3), source, mode="forward")
        adjoint = depass.attribute(tokens, dp.Logit(3), source, mode="adjoint")
        assert _relative_gap(adjoint.scores, forward.scores) <= 1e-10


def test_forward_scores_sum_to_target_for_nonlinear_rules():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    logits = model(tokens)
    for rule in ("softmax", "max", "relu", "linear"):
        attribution = dp.DePass(model, rule=rule).attribute(tokens, dp.Logit(4), dp.Tokens())
        assert attribution.mode == "forward"
        torch.testing.assert_close(attribution.scores.sum(-1)[:, 0], logits[:, -1, 4].detach())


@pytest.mark.parametrize("family", ["gpt2", "folded", "llama", "gemma", "neox", "solu_ln", "moe"])
def test_last_layer_matches_transformerlens_dla(family):
    """Components at the last resid_post read out exactly as TransformerLens's DLA (apply_ln)."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model, batch=2)
    _, cache = model.run_with_cache(tokens)
    last = model.cfg.n_layers - 1
    token = 9
    # TransformerLens's apply_ln assumes the final norm's weight is folded into W_U.
    ln_weight = getattr(model.ln_final, "w", None) if hasattr(model, "ln_final") else None
    direction = model.tokens_to_residual_directions(torch.tensor(token))
    if ln_weight is not None:
        direction = direction * ln_weight
    depass = dp.DePass(model)

    modules = depass.attribute(
        tokens, dp.Logit(token), dp.Modules(last), mode="forward", cache=cache
    )
    stack = torch.stack(
        [cache[f"blocks.{last}.hook_attn_out"], cache[f"blocks.{last}.hook_mlp_out"]]
    )
    stack = stack[:, :, -1]
    tl = cache.apply_ln_to_stack(stack, layer=None, pos_slice=-1) @ direction  # [2, batch]
    torch.testing.assert_close(modules.scores[:, 0, :2], tl.T, rtol=1e-10, atol=1e-10)

    if model.cfg.num_experts:
        return  # MoE neurons are per expert; the Neurons source refuses them
    neurons = depass.attribute(tokens, dp.Logit(token), dp.Neurons(last), mode="adjoint")
    if not model.cfg.use_normalization_before_and_after:
        stack = cache.stack_neuron_results(layer=last + 1, pos_slice=-1, apply_ln=True)
        tl = stack[-model.cfg.d_mlp :] @ direction  # [d_mlp, batch]
        torch.testing.assert_close(neurons.neurons(last)[:, 0], tl.T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", ["attn_only", "neox"])
def test_heads_at_last_layer_match_stack_head_results(family):
    """Where heads write straight into the last resid_post, DePass heads == TL head DLA."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model, batch=2)
    _, cache = model.run_with_cache(tokens)
    last = model.cfg.n_layers - 1
    scores = dp.DePass(model).attribute(
        tokens, dp.LogitDiff(3, 8), dp.Heads(last), cache=cache, mode="forward"
    )
    stack = cache.stack_head_results(layer=last + 1, pos_slice=-1, apply_ln=True)
    direction = model.tokens_to_residual_directions(
        torch.tensor(3)
    ) - model.tokens_to_residual_directions(torch.tensor(8))
    direction = direction * model.ln_final.w
    tl = (stack[-model.cfg.n_heads :] @ direction).T  # batch head
    torch.testing.assert_close(scores.heads()[:, 0, 0], tl, rtol=1e-10, atol=1e-10)


def test_combined_sources_share_one_backward():
    model = make_model("gpt2", torch.float32)
    tokens = random_tokens(model, batch=2)
    depass = dp.DePass(model)
    sources = [dp.Tokens(), dp.Heads(), dp.Neurons()]
    combined = depass.attribute(tokens, dp.Logit(5), sources, mode="adjoint")
    alone = [depass.attribute(tokens, dp.Logit(5), s, mode="adjoint") for s in sources]
    torch.testing.assert_close(combined.scores, torch.cat([a.scores for a in alone], dim=-1))
    assert len(combined.starts) == 1 + 3 + 3
    forward = depass.attribute(tokens, dp.Logit(5), sources, mode="forward")
    assert _relative_gap(combined.scores, forward.scores) <= AGREEMENT[torch.float32]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_matches_accumulated_resid(family):
    """Per-layer component shares add up to TransformerLens's logit lens at every layer.

    At the last layer we compare with the model's logit instead: in TransformerLens 3.9,
    ``accumulated_resid(layer=n_layers, apply_ln=True, pos_slice=-1)`` slices the cached final
    scale a second time and returns a different value for batches > 1.
    """
    model = make_model(family, torch.float64)
    tokens = random_tokens(model, batch=2)
    logits, cache = model.run_with_cache(tokens)
    lens = dp.DePass(model).run(tokens, cache=cache).logit_lens(dp.Logit(3))  # hook batch comp
    direction = model.tokens_to_residual_directions(torch.tensor(3)) * model.ln_final.w
    constant = model.b_U[3].detach()
    if hasattr(model.ln_final, "b"):
        constant = constant + (model.ln_final.b @ model.W_U[:, 3]).detach()
    for layer in range(model.cfg.n_layers - 1):
        acc = cache.accumulated_resid(layer=layer + 1, apply_ln=True, pos_slice=-1)[-1]
        torch.testing.assert_close(lens[layer].sum(-1), (acc @ direction).detach() + constant)
    torch.testing.assert_close(lens[-1].sum(-1), logits[:, -1, 3].detach())


def test_adjoint_mode_works_under_no_grad():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    expected = dp.DePass(model).attribute(tokens, dp.Logit(2), dp.Heads(), mode="adjoint")
    with torch.no_grad():
        inside = dp.DePass(model).attribute(tokens, dp.Logit(2), dp.Heads(), mode="adjoint")
    torch.testing.assert_close(inside.scores, expected.scores)
