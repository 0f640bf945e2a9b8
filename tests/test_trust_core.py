"""Trust at the edges: inputs and model states that used to give silent wrong numbers are refused.

Prompts past the context, ReferenceParity with a QK-aware attention split, hooks left on the model,
and caches that no longer belong to the model (issue 16). Each case used to return numbers that
explained something other than what was asked (a cut prompt, another convention, another model).
"""

from __future__ import annotations

import re

import pytest
import torch

import depass_lens as dp
from tests.conftest import TL, graph_model, make_model, make_text_model, random_tokens

# ---------------------------------------------------------------------------- prompts past n_ctx

#: 33 words + BOS = 34 tokens on a model with n_ctx = 24.
LONG = " ".join(["Mary", "and", "John"] * 11)
FITS = " ".join(["Mary", "and", "John"] * 7 + ["Mary", "and"])  # 23 words + BOS = 24 tokens
TOO_LONG = "34 tokens exceed the model's context of 24"


@pytest.fixture(scope="module")
def text_model():
    return make_text_model("gpt2")


def _text_calls(depass: dp.DePass, prompt):
    target = dp.Logit("John")
    return {
        "attribute": lambda: depass.attribute(prompt, target),
        "forward": lambda: depass.attribute(prompt, target, mode="forward"),
        "run": lambda: depass.run(prompt),
        "graph": lambda: depass.graph(prompt, target),
        "generate": lambda: depass.generate(prompt, max_new_tokens=1),
        "prepare": lambda: depass.prepare(prompt),
    }


@pytest.mark.parametrize("call", ["attribute", "forward", "run", "graph", "generate", "prepare"])
def test_prompt_past_the_context_is_refused_with_its_length(text_model, call):
    """TransformerLens's to_tokens cuts text at n_ctx; DePass used to explain the cut prompt (the
    target read at the wrong token). Text is now refused exactly as a token tensor is."""
    depass = dp.DePass(text_model, progress=False)
    with pytest.raises(dp.DePassInputError, match=TOO_LONG):
        _text_calls(depass, LONG)[call]()
    with pytest.raises(dp.DePassInputError, match=TOO_LONG):  # one long prompt in a batch
        _text_calls(depass, [FITS, LONG])[call]()
    tokens = text_model.to_tokens(LONG, truncate=False)
    assert tokens.shape[1] == 34
    with pytest.raises(dp.DePassInputError, match=TOO_LONG):  # the same length as ids
        depass.attribute(tokens, dp.Logit("John"))


def test_contrast_prompt_past_the_context_is_refused(text_model):
    """graph(contrast=...) tokenises the corrupted prompts through the same path."""
    depass = dp.DePass(text_model, progress=False)
    with pytest.raises(dp.DePassInputError, match=TOO_LONG):
        depass.graph(FITS, dp.Logit("John"), contrast=LONG)


def test_prompt_of_exactly_the_context_runs(text_model):
    """The boundary: n_ctx tokens are fine, and the value is the model's own logit there."""
    depass = dp.DePass(text_model, progress=False)
    attribution = depass.attribute(FITS, dp.Logit("John"))
    tokens = text_model.to_tokens(FITS)
    assert tokens.shape[1] == 24
    john = text_model.to_single_token("John")
    real = text_model(tokens)[0, -1, john]
    torch.testing.assert_close(attribution.target_values[0, 0], real, rtol=1e-9, atol=1e-9)


def test_multi_token_target_string_is_refused(text_model):
    """A target string is never cut to its first token (nor at n_ctx)."""
    depass = dp.DePass(text_model, progress=False)
    with pytest.raises(dp.DePassInputError, match="is 2 tokens"):
        depass.attribute(FITS, dp.Logit("Mary John"))
    with pytest.raises(dp.DePassInputError, match="is 33 tokens"):
        depass.attribute(FITS, dp.Logit(LONG))


# ---------------------------------------------------------------------------- ReferenceParity


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama", torch.float64, n_layers=2)
    return model, random_tokens(model, batch=1, n_pos=7)


def test_reference_parity_takes_the_reference_value_split(llama):
    """The reference freezes patterns; with the QK-aware default the same rule ranked otherwise."""
    model, tokens = llama
    target, source = dp.Logit(3), dp.Heads()
    rule = dp.ReferenceParity("softmax")
    default = dp.DePass(model, rule=rule, progress=False)
    assert default.attention.side == "value"
    explicit = dp.DePass(model, rule=rule, attention="value", progress=False)
    got = default.attribute(tokens, target, source)
    expected = explicit.attribute(tokens, target, source)
    assert got.attention == "value"
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-10)
    # what the default split used to give differs (so this test fails on the old default)
    symmetric = dp.DePass(model, rule="softmax", attention="symmetric", progress=False)
    value = dp.DePass(model, rule="softmax", attention="value", progress=False)
    gap = (
        symmetric.attribute(tokens, target, source).scores
        - value.attribute(tokens, target, source).scores
    )
    assert gap.abs().max() > 1e-3
    # per call: a ReferenceParity rule on a wrapper whose split was not chosen takes "value" too
    plain = dp.DePass(model, progress=False)
    assert plain.attention.side == "symmetric"
    per_call = plain.attribute(tokens, target, source, rule=rule)
    assert per_call.attention == "value"
    torch.testing.assert_close(per_call.scores, expected.scores, rtol=0, atol=1e-10)
    run = plain.run(tokens, rule=rule)["unembed.hook_in"]
    torch.testing.assert_close(run, explicit.run(tokens)["unembed.hook_in"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("side", ["symmetric", "pattern"])
def test_reference_parity_refuses_a_qk_aware_split(llama, side):
    """Asked for explicitly, the combination is refused naming attention="value"."""
    model, tokens = llama
    rule = dp.ReferenceParity("max")
    message = re.escape('attention="value"')
    with pytest.raises(dp.DePassInputError, match=message):
        dp.DePass(model, rule=rule, attention=side)
    with pytest.raises(dp.DePassInputError, match=message):
        dp.DePass(model, rule=rule).attribute(tokens, dp.Logit(3), attention=side)
    with pytest.raises(dp.DePassInputError, match=message):
        dp.DePass(model, attention=side).attribute(tokens, dp.Logit(3), rule=rule)
    with pytest.raises(dp.DePassInputError, match=message):
        dp.DePass(model).run(tokens, rule=rule, attention=dp.AttentionSplit(side))


# ---------------------------------------------------------------------------- hooks on the model


def _no_hooks(*modules) -> bool:
    return not any(hp.has_hooks() for m in modules for hp in m.hook_dict.values())


def _zero_z(z, hook):
    return z * 0


def _calls(depass: dp.DePass, tokens):
    target = dp.Logit(3)
    return {
        "run": lambda: depass.run(tokens),
        "forward": lambda: depass.attribute(tokens, target, dp.Heads(), mode="forward"),
        "adjoint": lambda: depass.attribute(tokens, target, dp.Heads(), mode="adjoint"),
        "graph": lambda: depass.graph(tokens, target),
        "generate": lambda: depass.generate(tokens[:, :5], max_new_tokens=2),
    }


CALLS = ["run", "forward", "adjoint", "graph", "generate"]


@pytest.mark.parametrize(
    "call, check", [(c, True) for c in CALLS] + [("forward", False), ("run", False)]
)
def test_hook_left_on_the_model_is_refused_by_name(call, check):
    """Adjoint mode and graphs used to follow the hooked model, forward mode to raise a
    losslessness error without naming the hook (or, with check=False, to return a third value).
    Every entry now refuses, naming the hook point; once removed, the plain numbers return."""
    model = graph_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, check=check, progress=False)
    plain = depass.attribute(tokens, dp.Logit(3), mode="adjoint").target_values
    model.add_hook("blocks.1.attn.hook_z", _zero_z)
    try:
        with pytest.raises(dp.DePassInputError, match="'blocks.1.attn.hook_z'") as info:
            _calls(depass, tokens)[call]()
        assert "reset_hooks" in str(info.value)
    finally:
        model.reset_hooks()
    assert _no_hooks(model, depass.engine)
    _calls(depass, tokens)[call]()  # runs once the hook is gone
    again = depass.attribute(tokens, dp.Logit(3), mode="adjoint").target_values
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-10)  # fp64, run again


def test_every_kind_of_user_hook_is_refused():
    """Permanent hooks, backward hooks and an open hooks() context are the user's too."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, progress=False)
    model.add_perma_hook("blocks.0.hook_mlp_out", lambda x, hook: x)
    with pytest.raises(dp.DePassInputError, match=r"'blocks.0.hook_mlp_out'.*including_permanent"):
        depass.attribute(tokens, dp.Logit(3))
    model.reset_hooks()  # a permanent hook survives this ...
    with pytest.raises(dp.DePassInputError, match="'blocks.0.hook_mlp_out'"):
        depass.attribute(tokens, dp.Logit(3))
    model.reset_hooks(including_permanent=True)
    model.add_hook("blocks.1.hook_resid_mid", lambda g, hook: g * 2, dir="bwd")
    with pytest.raises(dp.DePassInputError, match=r"'blocks.1.hook_resid_mid'.*\(1 backward\)"):
        depass.attribute(tokens, dp.Logit(3), mode="adjoint")
    model.reset_hooks()
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", lambda x, hook: x)]):
        with pytest.raises(dp.DePassInputError, match="'blocks.2.hook_resid_pre'"):
            depass.run(tokens)
    assert _no_hooks(model, depass.engine)
    depass.attribute(tokens, dp.Logit(3))  # DePass's own hooks never count as foreign


@pytest.mark.parametrize("mode", ["forward", "adjoint", "graph"])
def test_hook_kept_on_the_engine_is_refused_by_attribution(mode):
    """A hook kept on dp_model.engine acts on run(); forward-mode attribution used to follow it
    (a losslessness error not naming it, or with check=False another value, completeness 0)
    while adjoint mode and graphs ignored it. Attribution now refuses it by name."""
    model = graph_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, check=False, progress=False)
    depass.engine.add_hook("blocks.1.attn.hook_z", _zero_z)
    call = {
        "forward": lambda: depass.attribute(tokens, dp.Logit(3), mode="forward"),
        "adjoint": lambda: depass.attribute(tokens, dp.Logit(3), mode="adjoint"),
        "graph": lambda: depass.graph(tokens, dp.Logit(3)),
    }[mode]
    with pytest.raises(dp.DePassInputError, match="engine.*'blocks.1.attn.hook_z'"):
        call()
    hooked = depass.run(tokens)["unembed.hook_in"]  # run() follows it, as documented
    depass.engine.reset_hooks()
    call()
    plain = depass.run(tokens)["unembed.hook_in"]
    assert (hooked - plain).abs().max() > 1e-3


def test_interventions_on_the_decomposed_pass_still_work():
    """The way the refusal points to: fwd_hooks= on DePass.run acts on the decomposed pass."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, progress=False)

    def drop_token_2(x, hook):
        x = x.clone()
        x[:, 2] = 0
        return x

    res = depass.run(tokens, fwd_hooks=[("blocks.1.hook_resid_mid", drop_token_2)])
    assert res["unembed.hook_in"][0, 2].abs().max() == 0
    assert _no_hooks(model, depass.engine)


# ---------------------------------------------------------------------------- stale caches

#: A weight edited in place after caching, by TransformerLens 3 name and TransformerLens 4
#: (boot_native) parameter-name pattern.
WEIGHTS = {
    "W_pos": ("pos_embed.W_pos", r"^pos\..*weight$"),
    "W_V0": ("blocks.0.attn.W_V", r"^layers\.0\..*attn\..*\bv\..*weight$"),
    "W_Q2": ("blocks.2.attn.W_Q", r"^layers\.2\..*attn\..*\bq\..*weight$"),
    "W_out1": ("blocks.1.mlp.W_out", r"^layers\.1\..*mlp\..*fc_out\..*weight$"),
}


def _edit(model, which: str) -> None:
    tl3, tl4 = WEIGHTS[which]
    if TL >= 4:
        params = [p for n, p in model.original_model.named_parameters() if re.match(tl4, n)]
    else:
        params = [p for n, p in model.named_parameters() if n == tl3]
    assert len(params) == 1, which
    with torch.no_grad():
        params[0].mul_(1.5)


#: (weight edited, source, attention split): each missed by the losslessness check, which
#: compares the decomposition with the (stale) cache after the start point only.
STALE = {
    "pos_embed_tokens": ("W_pos", lambda: dp.Tokens(), "symmetric"),
    "before_the_start": ("W_V0", lambda: dp.Heads(1), "symmetric"),
    "query_after_the_start": ("W_Q2", lambda: dp.Tokens(), "value"),
    "mlp_with_check_off": ("W_out1", lambda: dp.Tokens(), None),
}


@pytest.mark.parametrize("case", sorted(STALE))
def test_cache_of_a_model_edited_after_caching_is_refused(case):
    """Each used to return the cached model's numbers for the edited one, losslessly."""
    which, source, attention = STALE[case]
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    _, cache = model.run_with_cache(tokens)
    _edit(model, which)
    depass = dp.DePass(
        model, attention=attention or "value", check=attention is not None, progress=False
    )
    with pytest.raises(dp.CacheMismatchError, match="changed after the cache was computed"):
        depass.attribute(tokens, dp.Logit(3), source(), mode="forward", cache=cache)
    with pytest.raises(dp.CacheMismatchError, match="changed after the cache was computed"):
        depass.run(tokens, source(), cache=cache)
    assert _no_hooks(model, depass.engine)
    fresh = depass.attribute(tokens, dp.Logit(3), source(), mode="forward")  # no cache: fine
    real = model(tokens)[0, -1, 3]
    torch.testing.assert_close(fresh.target_values[0, 0], real, rtol=1e-9, atol=1e-9)


def test_cache_computed_under_a_hook_or_without_the_mask_is_refused():
    """The cache is of another forward pass: a hook was on while caching, or no padding mask."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=2)
    depass = dp.DePass(model, check=False, progress=False)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _zero_z)]):
        _, hooked = model.run_with_cache(tokens)
    with pytest.raises(dp.CacheMismatchError, match="'blocks.1.hook_resid_mid'"):
        depass.attribute(tokens, dp.Logit(3), mode="forward", cache=hooked)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding on the second prompt
    _, unmasked = model.run_with_cache(tokens)
    with pytest.raises(dp.CacheMismatchError, match="attention mask"):
        depass.attribute(tokens, dp.Logit(3), mode="forward", cache=unmasked, attention_mask=mask)
    _, masked = model.run_with_cache(tokens, attention_mask=mask)
    got = depass.attribute(tokens, dp.Logit(3), mode="forward", cache=masked, attention_mask=mask)
    own = depass.attribute(tokens, dp.Logit(3), mode="forward", attention_mask=mask)
    torch.testing.assert_close(got.scores, own.scores, rtol=0, atol=1e-10)


def test_cache_without_the_final_stream_is_refused():
    """A cache holding only what propagation reads leaves nothing to compare with the model."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, attention="value", progress=False)
    names = set(depass.adapter.frozen_hook_names()) | {"hook_embed", "hook_pos_embed"}
    _, partial = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    _edit(model, "W_out1")
    with pytest.raises(dp.CacheMismatchError, match="lacks 'blocks.2.hook_resid_post'"):
        depass.attribute(tokens, dp.Logit(3), mode="forward", cache=partial)


def test_a_fresh_cache_is_accepted_with_and_without_check():
    """No false alarm: a cache of the model as it is gives the numbers of DePass's own run."""
    model = make_model("gpt2", torch.float32)
    tokens = random_tokens(model, batch=2)
    _, cache = model.run_with_cache(tokens)
    for check in (True, False):
        depass = dp.DePass(model, check=check, progress=False)
        got = depass.attribute(tokens, dp.Logit(3), dp.Heads(1), mode="forward", cache=cache)
        own = depass.attribute(tokens, dp.Logit(3), dp.Heads(1), mode="forward")
        torch.testing.assert_close(got.scores, own.scores, rtol=1e-5, atol=1e-6)
