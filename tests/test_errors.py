"""Bad input gets a clear error naming the problem, and leaves no hooks behind."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from tests.conftest import BASE, make_model, make_text_model, random_tokens, requires_tl3


def _no_hooks(*modules) -> bool:
    return not any(hp.has_hooks() for m in modules for hp in m.hook_dict.values())


@pytest.fixture
def setup():
    model = make_model("gpt2", torch.float64)
    return model, dp.DePass(model), random_tokens(model, batch=1)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
        (torch.zeros(1, 4), "integer"),
        (torch.tensor([[1, 2, 999]]), "outside the vocabulary"),
        (torch.tensor([[1, -1]]), "outside the vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(1, 100, dtype=torch.long), "context"),
    ],
)
def test_bad_tokens(setup, bad, message):
    model, depass, _ = setup
    with pytest.raises(dp.DePassInputError, match=message):
        depass.attribute(bad, dp.Logit(1))
    assert _no_hooks(model, depass.engine)


@pytest.mark.parametrize(
    "source", [dp.Tokens(layer=7), dp.Heads(layers=[3]), dp.Neurons(layer=-9), dp.Modules(5)]
)
def test_layer_out_of_range(setup, source):
    model, depass, tokens = setup
    with pytest.raises(dp.DePassInputError, match="out of range"):
        depass.attribute(tokens, dp.Logit(1), source)
    assert _no_hooks(model, depass.engine)


def test_bad_positions_and_heads(setup):
    _, depass, tokens = setup
    with pytest.raises(dp.DePassInputError, match="out of range"):
        depass.attribute(tokens, dp.Logit(1, pos=40))
    with pytest.raises(dp.DePassInputError, match="head 9"):
        depass.attribute(tokens, dp.Logit(1), dp.Heads(0, heads=[9]))
    with pytest.raises(dp.DePassInputError, match="neuron"):
        depass.attribute(tokens, dp.Logit(1), dp.Neurons(0, neurons=[1000]))


def test_unknown_and_multi_token_targets():
    model = make_text_model()
    depass = dp.DePass(model)
    prompt = "When Mary and John went to the store"
    with pytest.raises(dp.DePassInputError, match="2 tokens"):
        depass.attribute(prompt, dp.Logit("Mary John"))
    with pytest.raises(dp.DePassInputError, match="not in the vocabulary"):
        depass.attribute(prompt, dp.Logit("Zebra"))
    with pytest.raises(dp.DePassInputError, match="outside the vocabulary"):
        depass.attribute(prompt, dp.Logit(10_000))
    with pytest.raises(dp.DePassInputError, match="does not know"):
        depass.attribute("When Zebra went", dp.Logit("Mary"))
    assert _no_hooks(model, depass.engine)
    # and the good path works with string targets
    ok = depass.attribute(prompt, dp.LogitDiff("Mary", "John"))
    assert ok.scores.shape == (1, 1, 10)


def test_components_that_do_not_sum(setup):
    model, depass, tokens = setup
    _, cache = model.run_with_cache(tokens)
    state = cache["blocks.1.hook_resid_pre"]
    wrong = torch.stack([state, state], dim=1)  # sums to 2x the state
    with pytest.raises(dp.DePassInputError, match="do not sum"):
        depass.run(tokens, dp.Custom("blocks.1.hook_resid_pre", wrong))
    with pytest.raises(dp.DePassInputError, match="shape"):
        depass.run(tokens, dp.Custom("blocks.1.hook_resid_pre", wrong[:, :, :3]))


def test_nan_and_inf_inputs(setup):
    model, depass, tokens = setup
    _, cache = model.run_with_cache(tokens)
    state = cache["blocks.1.hook_resid_pre"].unsqueeze(1).clone()
    state[0, 0, 0, 0] = torch.nan
    with pytest.raises(dp.DePassInputError, match="NaN"):
        depass.run(tokens, dp.Custom("blocks.1.hook_resid_pre", state))
    with pytest.raises(dp.DePassInputError, match="NaN"):
        depass.attribute(tokens, dp.Direction(torch.full((32,), torch.inf)))
    with pytest.raises(dp.DePassInputError, match="NaN"):
        depass.attribute(tokens, dp.Logit(1), dp.Subspace(1, torch.full((2, 32), torch.nan)))
    cache.cache_dict["blocks.1.attn.hook_pattern"] = cache["blocks.1.attn.hook_pattern"] * torch.nan
    with pytest.raises(dp.CacheMismatchError, match="NaN"):
        depass.run(tokens, cache=cache)
    assert _no_hooks(model, depass.engine)


def test_cache_from_another_prompt_or_model(setup):
    model, depass, tokens = setup
    _, cache = model.run_with_cache(tokens)
    other_tokens = (tokens + 1) % model.cfg.d_vocab
    with pytest.raises(dp.CacheMismatchError, match="another prompt"):
        depass.run(other_tokens, cache=cache)
    with pytest.raises(dp.CacheMismatchError, match="another prompt"):
        depass.run(tokens[:, :-1], cache=cache)
    other = make_model("gpt2", torch.float64)
    _, other_cache = other.run_with_cache(tokens)
    with pytest.raises(dp.CacheMismatchError, match="different model"):
        depass.run(tokens, cache=other_cache)
    _, partial = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    with pytest.raises(dp.CacheMismatchError, match="lacks"):
        depass.run(tokens, cache=partial)


def test_model_mutated_after_caching(setup):
    model, depass, tokens = setup
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        model.blocks[0].attn.W_V.mul_(1.5)
    with pytest.raises(dp.CacheMismatchError, match="changed after the cache"):
        depass.run(tokens, cache=cache)
    assert _no_hooks(model, depass.engine)


@requires_tl3
def test_unsupported_configs_are_named():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**{**BASE, "act_fn": "gelu", "attention_dir": "bidirectional"})
    with pytest.raises(dp.UnsupportedModelError, match="attention_dir"):
        dp.DePass(HookedTransformer(cfg))
    clipped = HookedTransformerConfig(**{**BASE, "act_fn": "silu", "clip_qkv": 8.0})
    with pytest.raises(dp.UnsupportedModelError, match="clip_qkv"):
        dp.DePass(HookedTransformer(clipped))
    gpt_oss = make_model("moe")
    gpt_oss.cfg.original_architecture = "GptOssForCausalLM"
    with pytest.raises(dp.UnsupportedModelError, match="GPT-OSS"):
        dp.DePass(gpt_oss)
    with pytest.raises(TypeError, match="HookedTransformer"):
        dp.DePass(torch.nn.Linear(2, 2))


def test_adjoint_with_nonlinear_rule_is_refused(setup):
    _, depass, tokens = setup
    with pytest.raises(dp.DePassInputError, match="linear"):
        depass.attribute(tokens, dp.Logit(1), rule="softmax", mode="adjoint")
    with pytest.raises(dp.DePassInputError, match="unknown MLP rule"):
        depass.attribute(tokens, dp.Logit(1), rule="sigmoid")


def test_target_before_start_point(setup):
    _, depass, tokens = setup
    with pytest.raises(dp.DePassInputError, match="before the source"):
        depass.attribute(
            tokens, dp.HiddenState("blocks.0.hook_resid_post"), dp.Heads(2), mode="forward"
        )
    with pytest.raises(dp.DePassInputError, match="does not have"):
        depass.attribute(tokens, dp.HiddenState("blocks.9.hook_resid_post"))


def _break_w_in(model):
    with torch.no_grad():
        model.blocks[0].mlp.W_in[3, 5] = torch.nan


def _break_w_e(model, tokens):
    with torch.no_grad():
        model.embed.W_E[tokens[0, 2]] = torch.inf


def _nan_hook(value, hook):
    return value * torch.nan


BROKEN = {  # how the state is broken -> (what must be named)
    "nan_W_in": (lambda m, t: _break_w_in(m), ["'blocks.0.mlp.hook_pre'", "blocks.0.mlp.W_in"]),
    "inf_W_E": (_break_w_e, ["'hook_embed'", "embed.W_E (inf)"]),
    "nan_hook": (
        lambda m, t: m.add_hook("blocks.1.hook_mlp_out", _nan_hook),
        ["'blocks.1.hook_mlp_out'"],
    ),
}


def _calls(depass, tokens):
    return {
        "run": lambda: depass.run(tokens),
        "forward": lambda: depass.attribute(tokens, dp.Logit(1), dp.Heads(), mode="forward"),
        "adjoint": lambda: depass.attribute(tokens, dp.Logit(1), dp.Heads(), mode="adjoint"),
        "graph": lambda: depass.graph(tokens, dp.Logit(1)),
    }


@pytest.mark.parametrize("call", ["run", "forward", "adjoint", "graph"])
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_model_state_is_refused(broken, call):
    """NaN/inf in a weight or in a real activation: refused, naming the first hook (and weight)."""
    model = make_model("gpt2", torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    breaks, named = BROKEN[broken]
    breaks(model, tokens)
    # a hook left on the model is refused by name before anything runs (test_trust_core.py)
    message = "carries hooks" if broken == "nan_hook" else "model's state is broken"
    try:
        with pytest.raises(dp.DePassInputError, match=message) as info:
            _calls(depass, tokens)[call]()
    finally:
        model.reset_hooks()
    for name in named:
        assert name in str(info.value)
    assert _no_hooks(model, depass.engine)


def test_broken_cache_vs_broken_model():
    """A user's cache with NaN from a healthy model is the cache's fault; from a broken one, not."""
    model = make_model("gpt2", torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=1)
    _, cache = model.run_with_cache(tokens)
    cache.cache_dict["blocks.1.mlp.hook_post"] = cache["blocks.1.mlp.hook_post"] * torch.inf
    with pytest.raises(dp.CacheMismatchError, match="'blocks.1.mlp.hook_post'"):
        dp.DePass(model).run(tokens, cache=cache)
    _break_w_in(model)
    _, broken = model.run_with_cache(tokens)
    with pytest.raises(dp.DePassInputError, match="'blocks.0.mlp.hook_pre'"):
        dp.DePass(model).run(tokens, cache=broken)


def test_padding_is_not_a_broken_state():
    """Masked scores are -inf in hook_attn_scores by design: no false alarm, with any split."""
    model = make_model("gpt2", torch.float64, n_layers=2)
    tokens = random_tokens(model, batch=2)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert bool(torch.isinf(cache["blocks.0.attn.hook_attn_scores"]).any())
    for split in ("value", "symmetric"):
        depass = dp.DePass(model, attention=split)
        res = depass.run(tokens, cache=cache, attention_mask=mask)
        assert bool(torch.isfinite(res["unembed.hook_in"]).all())
        scores = depass.attribute(tokens, dp.Logit(1), attention_mask=mask, mode="adjoint")
        assert bool(torch.isfinite(scores.scores).all())
    scores_hook = "blocks.0.attn.hook_attn_scores"
    assert dp.frozen.is_finite_activation(scores_hook, torch.tensor([0.0, -torch.inf]))
    assert not dp.frozen.is_finite_activation(scores_hook, torch.tensor([0.0, torch.nan]))
    assert not dp.frozen.is_finite_activation("blocks.0.hook_resid_pre", torch.tensor([-torch.inf]))
