"""The decomposed run is a HookedRootModule: TransformerLens hook names, caching, interventions."""

from __future__ import annotations

import torch

import depass_lens as dp
from tests.conftest import make_model, random_tokens


def test_hook_names_mirror_transformerlens():
    model = make_model("gpt2")
    engine = dp.DePass(model).engine
    for name in (
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_mid",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
        "ln_final.hook_normalized",
        "unembed.hook_in",
    ):
        assert name in engine.hook_dict and name in model.hook_dict, name
    assert not list(engine.parameters()), "the decomposed module must not copy weights"


def test_cache_indexing_like_activation_cache():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    res = dp.DePass(model).run(tokens)
    torch.testing.assert_close(res["resid_post", 1], res["blocks.1.hook_resid_post"])
    assert res["blocks.1.hook_resid_post"].shape == (1, tokens.shape[1] + 1, tokens.shape[1], 32)


def test_zeroing_a_component_mid_pass_matches_direct_recomputation():
    """Zero component c at blocks.1.hook_resid_mid; with the linear rule the logit must drop by
    exactly c's downstream share, computed independently by adjoint mode on the real model."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    hook, c, token = "blocks.1.hook_resid_mid", 3, 7
    base = depass.run(tokens, names_filter=lambda n: True)

    def zero(x, hook):
        x = x.clone()
        x[:, c] = 0
        return x

    hooked = depass.run(tokens, fwd_hooks=[(hook, zero)], names_filter=lambda n: True)
    assert hooked[hook][:, c].abs().max() == 0
    final_base, final_hooked = base["unembed.hook_in"], hooked["unembed.hook_in"]
    others = [i for i in range(final_base.shape[1]) if i != c]
    torch.testing.assert_close(final_hooked[:, others], final_base[:, others])  # linear rule
    assert final_hooked[:, c].abs().max() == 0

    # Independent path: c's share of the logit through the frozen-linearised *real* model.
    share = depass.attribute(tokens, dp.Logit(token), dp.Custom(hook, base[hook]), mode="adjoint")
    real_logit = model(tokens)[0, -1, token]
    hooked_logit = hooked.logit_attribution(token).sum()
    torch.testing.assert_close(hooked_logit, real_logit.detach() - share.scores[0, 0, c])
    # and DePass left the engine clean
    assert not any(hp.has_hooks() for hp in depass.engine.hook_points())


def test_intervention_with_nonlinear_rule_keeps_removed_component_out():
    model = make_model("llama", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model, rule="softmax")

    def zero(x, hook):
        x = x.clone()
        x[:, 2] = 0
        return x

    res = depass.run(tokens, fwd_hooks=[("blocks.0.hook_resid_post", zero)])
    assert res["unembed.hook_in"][:, 2].abs().max() == 0


def test_persistent_hook_on_engine_and_reset():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    seen = []
    depass.engine.add_hook("blocks.0.attn.hook_z", lambda z, hook: seen.append(z.shape))
    depass.run(tokens)
    assert seen and seen[0][1] == tokens.shape[1] + 1  # comp axis after batch
    depass.engine.reset_hooks()
    assert not any(hp.has_hooks() for hp in depass.engine.hook_points())


def test_inputs_are_never_modified_in_place():
    """Residual adds are in place only on the engine's own tensors, never on user components."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    _, cache = model.run_with_cache(tokens)
    state = cache["blocks.1.hook_resid_pre"]
    comps = torch.stack([0.25 * state, 0.75 * state], dim=1)
    before = comps.clone()
    for chunk in (None, 1):
        dp.DePass(model, chunk_size=chunk).attribute(
            tokens, dp.Logit(1), dp.Custom("blocks.1.hook_resid_pre", comps), mode="forward"
        )
    assert torch.equal(comps, before)
