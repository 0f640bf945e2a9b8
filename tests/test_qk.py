"""The QK circuit: score shares, the pattern-side attention splits and the AttentionScore target."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.integrated_softmax import IntegratedSoftmax
from depass_lens.qk import layer_qk
from tests.conftest import AGREEMENT, FAMILIES, TL, make_model, random_tokens, requires_tl3

SIDES = ["pattern", "symmetric"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_queries_and_keys_reproduce_transformerlens_scores(family):
    """Our frozen-norm QK path gives TransformerLens's hook_attn_scores (ALiBi is the rest)."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model)
    _, cache = model.run_with_cache(tokens)
    adapter = dp.DePass(model).adapter
    for layer in range(model.cfg.n_layers):
        real = layer_qk(adapter, layer, cache, None)
        if model.cfg.positional_embedding_type == "alibi":
            from transformer_lens.components.abstract_attention import AbstractAttention

            n = tokens.shape[1]
            alibi = AbstractAttention.create_alibi_bias(model.cfg.n_heads, n, "cpu")
            expected = torch.where(real.allowed, alibi.to(real.extra.dtype), 0.0)
            torch.testing.assert_close(real.extra, expected.expand_as(real.extra))
        else:
            assert real.extra.abs().max() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pattern_side_is_lossless_at_every_hook(family, side, dtype):
    model = make_model(family, dtype)
    tokens = random_tokens(model)
    _, cache = model.run_with_cache(tokens)
    result = dp.DePass(model, attention=side).run(tokens, cache=cache, names_filter=lambda n: True)
    errors = result.check_lossless(cache)
    assert {"blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"} <= set(errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE[dtype], (worst, errors[worst])


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pattern_side_adjoint_equals_forward(family, side):
    """Standing test, as for the value side: adjoint == forward to AGREEMENT (fp32), every
    source kind."""
    model = make_model(family, torch.float32)
    tokens = random_tokens(model)
    depass = dp.DePass(model, attention=side)
    sources = [dp.Tokens(), dp.Heads(), dp.Modules(1)]
    if not model.cfg.attn_only and not model.cfg.num_experts:
        sources.append(dp.Neurons(0))
    targets = [dp.Logit(5), dp.LogitDiff(7, 11, pos=-2)]
    forward = depass.attribute(tokens, targets, sources, mode="forward")
    adjoint = depass.attribute(tokens, targets, sources, mode="adjoint")
    gap = float((adjoint.scores - forward.scores).abs().max() / forward.scores.abs().max())
    assert gap <= AGREEMENT[torch.float32], gap
    assert forward.completeness_error() <= 1e-5 and adjoint.attention == side


def test_splits_differ_and_the_default_is_symmetric_where_supported():
    """From heads of layer 1 only layer 2's attention lies ahead, so symmetric is the average
    (further back the splits compose and it is not). The default is the symmetric split; on a
    model whose QK path is not followed (attention sinks) it is the published value split."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    source = dp.Heads(1)
    scores = {
        side: dp.DePass(model, attention=side).attribute(tokens, dp.Logit(2), source).scores
        for side in ("value", "pattern", "symmetric")
    }
    assert (scores["value"] - scores["pattern"]).abs().max() > 1e-3
    torch.testing.assert_close(scores["symmetric"], 0.5 * (scores["value"] + scores["pattern"]))
    default = dp.DePass(model).attribute(tokens, dp.Logit(2), source)
    assert default.attention == "symmetric"
    torch.testing.assert_close(default.scores, scores["symmetric"])
    if TL < 4:  # attention sinks are a TransformerLens 3 setting
        sinks = make_model("gpt2", torch.float64, use_attention_sinks=True)
        assert dp.DePass(sinks).attention.side == "value"


@pytest.mark.parametrize("side", ["left", "right"])
def test_pattern_side_with_padding(side):
    """Padded rows (rotary positions from the mask) score as the prompt alone; pads score 0."""
    model = make_model("llama", torch.float64)
    long, short = random_tokens(model, batch=2, n_pos=8, seed=4)
    short = short[:5]
    pad = torch.zeros(3, dtype=torch.long)
    tokens = torch.stack(
        [long, torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])]
    )
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0 if side == "left" else 1
    if side == "right":
        mask[1, 5:] = 0
    depass = dp.DePass(model, attention="symmetric")
    for mode in ("forward", "adjoint"):
        batched = depass.attribute(tokens, dp.Logit(6), dp.Tokens(), mode=mode, attention_mask=mask)
        alone = depass.attribute(short[None], dp.Logit(6), dp.Tokens(), mode=mode)
        real = slice(3, 8) if side == "left" else slice(0, 5)
        torch.testing.assert_close(batched.tokens()[1, 0, real], alone.tokens()[0, 0])


def test_integrated_softmax_is_exact_and_self_adjoint():
    gen = torch.Generator().manual_seed(0)
    scores = 8 * torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril().expand_as(scores)
    scores = torch.where(allowed, scores, -torch.inf)
    pattern = torch.softmax(scores, -1)
    integrated = IntegratedSoftmax(scores, allowed, pattern)
    moved = integrated.apply(torch.where(allowed, scores, 0.0).unsqueeze(1))[:, 0]
    torch.testing.assert_close(moved + integrated.remainder + integrated.uniform, pattern)
    assert integrated.error <= 1e-6 and integrated.n_nodes in (8, 16, 32, 64)
    # M is symmetric per row: <M a, b> == <a, M b>, which is why its backward is M itself
    a, b = (torch.randn(2, 1, 3, 6, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    a, b = a * allowed[:, None], b * allowed[:, None]
    torch.testing.assert_close((integrated.apply(a) * b).sum(), (a * integrated.apply(b)).sum())
    leaf = a.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((integrated.apply(leaf) * b).sum(), leaf)
    torch.testing.assert_close(grad, integrated.apply(b))


@pytest.mark.parametrize("score_side", ["query", "key", "symmetric"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "alibi_local", "shortformer"])
def test_attention_score_target(family, score_side):
    """Shares of a score sum to hook_attn_scores, and adjoint == forward."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model)
    _, cache = model.run_with_cache(tokens)
    target = [dp.AttentionScore(2, h, query_pos=-1, key_pos=-3, side=score_side) for h in (0, 3)]
    depass = dp.DePass(model)
    forward = depass.attribute(tokens, target, [dp.Tokens(), dp.Heads(1)], mode="forward")
    adjoint = depass.attribute(tokens, target, [dp.Tokens(), dp.Heads(1)], mode="adjoint")
    n = tokens.shape[1]
    real = cache["blocks.2.attn.hook_attn_scores"][:, [0, 3], n - 1, n - 3]
    torch.testing.assert_close(forward.target_values, real)
    assert forward.completeness_error() <= 1e-10
    torch.testing.assert_close(adjoint.scores, forward.scores, rtol=1e-9, atol=1e-9)


def test_attention_score_sides_at_layer_zero():
    """At layer 0 the query side comes only from the query token, the key side from the key's."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    for side, position in (("query", 8), ("key", 3)):
        shares = depass.attribute(tokens, dp.AttentionScore(0, 1, 8, 3, side=side)).tokens()[0, 0]
        others = [p for p in range(tokens.shape[1]) if p != position]
        assert shares[others].abs().max() == 0 and shares[position].abs() > 0


def test_attention_score_errors():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    with pytest.raises(dp.DePassInputError, match="masked"):
        depass.attribute(tokens, dp.AttentionScore(1, 0, query_pos=2, key_pos=5))
    with pytest.raises(dp.DePassInputError, match="out of range"):
        depass.attribute(tokens, dp.AttentionScore(7, 0, -1, 0))
    with pytest.raises(dp.DePassInputError, match="side"):
        dp.AttentionScore(1, 0, -1, 0, side="values")
    with pytest.raises(dp.DePassInputError, match="before the source"):
        depass.attribute(tokens, dp.AttentionScore(1, 0, -1, 0), dp.Heads(1))
    with pytest.raises(dp.DePassInputError, match="attention side"):
        dp.DePass(model, attention="keys")


def test_score_hooks_on_the_value_side_and_interventions():
    """Caching attn.hook_attn_scores splits the scores even with frozen patterns; zeroing a
    component's pattern share removes exactly its steering term."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    _, cache = model.run_with_cache(tokens)
    depass = dp.DePass(model)
    res = depass.run(tokens, names_filter=lambda n: n.endswith("hook_attn_scores"))
    assert max(res.check_lossless(cache).values()) <= 1e-10

    pattern_side = dp.DePass(model, attention="pattern")
    base = pattern_side.run(tokens, names_filter=lambda n: True)

    def drop(x, hook):
        x = x.clone()
        x[:, 2] = 0
        return x

    hooked = pattern_side.run(
        tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", drop)], names_filter=lambda n: True
    )
    moved = base["blocks.1.attn.hook_pattern"][:, 2]  # component 2's pattern share
    v_real = cache["blocks.1.attn.hook_v"]
    lost = torch.einsum("bhqk,bkhd->bqhd", moved, v_real)
    torch.testing.assert_close(
        hooked["blocks.1.attn.hook_z"][:, 2], base["blocks.1.attn.hook_z"][:, 2] - lost
    )


@requires_tl3  # attention sinks are a TransformerLens 3 setting (Bridge refusals: test_bridge.py)
def test_unsupported_settings_are_named_for_the_pattern_side():
    model = make_model("gpt2", use_attention_sinks=True)
    dp.DePass(model)  # the value side only needs the pattern
    with pytest.raises(dp.UnsupportedModelError, match="use_attention_sinks"):
        dp.DePass(model, attention="symmetric")


def test_induction_heads_read_keys_written_by_the_previous_token_head():
    """On the zoo's induction model the key side of every induction head's score on the token
    after the earlier occurrence comes from L0H1, the previous-token head (K-composition), and
    the pattern side ranks L0H1 first for the answer, as ablation does."""
    from depass_lens import zoo

    model = zoo.load("induction")
    task = zoo.task("induction")
    examples = task.examples(16, seed=21)
    batch = task.batch(model, 16, seed=21)
    key = torch.tensor([ex.words.index(ex.words[-1]) + 2 for ex in examples])  # BOS offset + 1
    depass = dp.DePass(model)
    targets = [dp.AttentionScore(1, h, -1, key, side="key") for h in range(4)]
    shares = depass.attribute(batch.tokens, targets, dp.Heads(0)).scores.mean(0)  # head comp
    heads = shares[:, :4]  # L0H0..L0H3 (then rest, bias)
    assert (heads.argmax(-1) == 1).all()
    assert (heads[:, 1] > 0.8 * shares.sum(-1)).all()

    answer = dp.LogitDiff(batch.answers, batch.wrong)
    ranked = dp.DePass(model, attention="pattern").attribute(batch.tokens, answer, dp.Heads())
    assert ranked.top(1)[0][0] == "L0H1"
    value_side = dp.DePass(model).attribute(batch.tokens, answer, dp.Heads())
    assert value_side.top(1)[0][0] != "L0H1"  # what a frozen pattern cannot see


def test_results_keep_the_split_and_carry_no_graph():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, attention="symmetric")
    combined = depass.attribute(tokens, dp.Logit(2), [dp.Tokens(), dp.Heads()])
    assert combined.restrict("head").attention == "symmetric"
    lens = depass.run(tokens).logit_lens(dp.Logit(2))
    assert not lens.requires_grad
    name = dp.AttentionScore(1, 0, -1, torch.tensor([3])).names(None)[0]
    assert name == "L1H0 score, query -1, key per-prompt (symmetric)"


def test_forward_mode_builds_each_layers_qk_once(monkeypatch):
    """The real QK quantities depend on the input only: one build per layer, not per start."""
    import depass_lens.propagate as propagate

    calls = []
    original = propagate.layer_qk
    monkeypatch.setattr(
        propagate, "layer_qk", lambda *args: calls.append(args[1]) or original(*args)
    )
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    depass = dp.DePass(model, attention="symmetric")
    depass.attribute(tokens, dp.Logit(2), dp.Heads(), mode="forward")  # 3 start points
    assert sorted(calls) == list(range(1, model.cfg.n_layers))  # layers after the first start
