"""The DePass invariant: propagated components sum to the real activation at every hook point.

Checked for every architecture family, every MLP rule and both float types, at every hook the
decomposed run shares with the real run (residual stream, attention values/z, MLP pre/post, ...),
and for the decomposed logits.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.decomposition import relative_error
from tests.conftest import make_model, random_tokens
from tests.naive_depass import without_biases

pytestmark = pytest.mark.numerics  # also run under test.sh's second math configuration

RULES = ["taylor", "softmax", "max", "relu", "linear"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rule", RULES)
def test_lossless_at_every_hook(family, rule, dtype):
    model = make_model(family, dtype)
    tokens = random_tokens(model)
    logits, cache = model.run_with_cache(tokens)
    result = dp.DePass(model).run(tokens, cache=cache, rule=rule, names_filter=lambda n: True)

    errors = result.check_lossless(cache)
    must_have = {
        "blocks.0.hook_resid_pre",
        f"blocks.{model.cfg.n_layers - 1}.hook_resid_post",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_attn_out",
    }
    if not model.cfg.attn_only:
        must_have.add("blocks.1.hook_mlp_out")
    if not model.cfg.attn_only and not model.cfg.num_experts:  # MoE: expert-internal hooks
        must_have |= {"blocks.1.mlp.hook_post", "blocks.1.mlp.hook_pre"}
    assert must_have <= set(errors), sorted(must_have - set(errors))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE[dtype], (worst, errors[worst])

    # The decomposed logits sum to the model's logits (before any output soft cap).
    decomposed_logits = result.logits()
    assert relative_error(decomposed_logits, cache["unembed.hook_out"]) <= TOLERANCE[dtype]
    if model.cfg.output_logits_soft_cap <= 0:
        assert relative_error(decomposed_logits, logits) <= TOLERANCE[dtype]


@pytest.mark.parametrize("rule", RULES)
def test_chunked_equals_unchunked(rule):
    model = make_model("llama", torch.float64)
    tokens = random_tokens(model, n_pos=11)
    full = dp.DePass(model, rule=rule).run(tokens)
    chunked = dp.DePass(model, rule=rule, chunk_size=3).run(tokens)
    for name in ("blocks.2.hook_resid_post", "unembed.hook_in"):
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-10, atol=1e-10)  # fp64


@pytest.mark.parametrize("side", ["gate", "up", "symmetric"])
def test_gated_taylor_sides_lossless(side):
    model = make_model("llama", torch.float64)
    tokens = random_tokens(model)
    _, cache = model.run_with_cache(tokens)
    result = dp.DePass(model, rule=dp.TaylorRule(side=side)).run(tokens, cache=cache)
    assert max(result.check_lossless(cache).values()) <= 1e-10


def test_components_are_not_trivially_split():
    """Guard against a 'lossless' engine that puts everything in one component."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    final = dp.DePass(model).run(tokens)["unembed.hook_in"][0, :, -1]  # comp d_model
    norms = final.norm(dim=-1)
    assert (norms[:-1] > 1e-3 * norms.max()).sum() >= tokens.shape[1] // 2


@pytest.mark.parametrize("inner", ["softmax", "max", "relu", "linear"])
def test_reference_parity_conventions(inner):
    """The reference conventions, behind an explicit wrapper, are lossless and do what they say."""
    model = without_biases(make_model("llama", torch.float64))  # like LLaMA: no bias component
    tokens = random_tokens(model, batch=1)
    _, cache = model.run_with_cache(tokens)
    rule = dp.ReferenceParity(inner)
    res = dp.DePass(model, rule=rule).run(tokens, cache=cache, names_filter=lambda n: True)
    assert max(res.check_lossless(cache).values()) <= 1e-10
    post = res["blocks.0.mlp.hook_post"][0]  # comp pos d_mlp
    value = cache["blocks.0.mlp.hook_post"][0, 0]
    torch.testing.assert_close(post[0, 0], value)  # position 0: only BOS is there (share 1.0)
    assert post[1:, 0].abs().max() == 0
    assert post[0, 1:].abs().max() == 0  # BOS gets no MLP output after position 0
    # head level: rest (share 1.0 at position 0) competes with the heads there; no BOS rule
    heads = dp.DePass(model, rule=rule).run(
        tokens, dp.Heads(0), cache=cache, names_filter=lambda n: True
    )
    assert max(heads.check_lossless(cache).values()) <= 1e-10
    later = heads["blocks.1.mlp.hook_post"][0]  # head, ..., rest, bias
    assert later[:-2, 0].abs().max() > 0
    with pytest.raises(dp.DePassInputError, match="non-linear"):
        dp.ReferenceParity("taylor")
