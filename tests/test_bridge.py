"""TransformerLens 4: how DePass takes a ``TransformerBridge`` (compatibility mode, the adapter
picked by type, native attention scores) and what it refuses on one, by name."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.adapters import make_adapter, repair_native_scores
from depass_lens.decomposition import tolerance
from tests.conftest import BASE, TL, TL4_ONLY, make_model, random_tokens

pytestmark = pytest.mark.skipif(TL < 4, reason=TL4_ONLY)


def plain_native(**config):
    """A ``boot_native`` bridge exactly as TransformerLens builds it (no compatibility mode)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401 - attaches boot_native
    from transformer_lens.model_bridge import TransformerBridge

    fields = {**BASE, "act_fn": "gelu_new", "normalization_type": "LN", **config}
    return TransformerBridge.boot_native(fields, dtype=torch.float64).eval()


def test_the_adapter_is_picked_by_type():
    from depass_lens.adapters.bridge import BridgeAdapter

    assert isinstance(make_adapter(plain_native()), BridgeAdapter)
    with pytest.raises(TypeError, match="TransformerBridge"):
        make_adapter(torch.nn.Linear(2, 2))


def test_compatibility_mode_is_switched_on_without_changing_the_model():
    bridge = plain_native()
    tokens = random_tokens(bridge)
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    with torch.no_grad():
        logits = bridge(tokens)
    assert not getattr(bridge, "compatibility_mode", False)
    dp.DePass(bridge)
    assert bridge.compatibility_mode
    after = bridge.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        # the same fp64 computation run again: equal up to rounding (which may vary run to run)
        torch.testing.assert_close(bridge(tokens), logits, rtol=1e-10, atol=1e-10)


def test_native_scores_are_refused_until_repaired():
    """TL 4.3's native attention fires the pattern at hook_attn_scores: the QK path is refused
    (naming the fix) and the default split is the value split; after the repair the scores are
    real and the QK-aware default applies, the model's outputs unchanged."""
    bridge = plain_native()
    tokens = random_tokens(bridge)
    assert dp.DePass(bridge).attention.side == "value"
    with pytest.raises(dp.UnsupportedModelError, match="repair_native_scores"):
        dp.DePass(bridge, attention="symmetric")
    logits, cache = bridge.run_with_cache(tokens)
    assert torch.equal(cache["blocks.0.attn.hook_attn_scores"], cache["blocks.0.attn.hook_pattern"])
    errors = dp.DePass(bridge).run(tokens, cache=cache).check_lossless(cache)
    assert max(errors.values()) <= tolerance(torch.float64)

    repair_native_scores(bridge)
    repaired, cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(repaired, logits, rtol=1e-10, atol=1e-10)  # fp64, another path
    scores = cache["blocks.0.attn.hook_attn_scores"]
    assert torch.isinf(scores).any() and not torch.equal(scores.softmax(-1), scores)
    torch.testing.assert_close(scores.softmax(-1), cache["blocks.0.attn.hook_pattern"])
    depass = dp.DePass(bridge)
    assert depass.attention.side == "symmetric"
    errors = depass.run(tokens, cache=cache, names_filter=lambda n: True).check_lossless(cache)
    assert "blocks.1.attn.hook_attn_scores" in errors
    assert max(errors.values()) <= tolerance(torch.float64)


def test_what_a_bridge_cannot_do_is_refused_by_name():
    with pytest.raises(dp.UnsupportedModelError, match="SoLU-LN"):
        dp.DePass(plain_native(act_fn="solu_ln"))
    grouped = make_model("llama", torch.float64)  # n_key_value_heads=2 < n_heads=4
    with pytest.raises(dp.UnsupportedModelError, match="grouped-query attention"):
        dp.DePass(grouped).graph(random_tokens(grouped), dp.Logit(3))
    hooked_mlp_in = make_model("gpt2")
    hooked_mlp_in.set_use_hook_mlp_in(True)  # the graph splits the MLP input itself
    with pytest.raises(dp.UnsupportedModelError, match="use_hook_mlp_in"):
        dp.DePass(hooked_mlp_in).graph(random_tokens(hooked_mlp_in), dp.Logit(3))


def test_zoo_models_are_bridges_with_the_shipped_weights():
    from depass_lens import zoo

    model = zoo.load("recall")
    assert type(model).__name__ == "TransformerBridge" and model.compatibility_mode
    assert dp.DePass(model).attention.side == "symmetric"  # the zoo repairs native scores
    batch = zoo.task("recall").batch(model, 8)
    with torch.no_grad():
        logits = model(batch.tokens)[:, -1]
    accuracy = (logits.argmax(-1) == batch.answers.flatten()).float().mean()
    assert accuracy >= 0.9  # the trained model still does its task


def test_depass_own_norm_hooks_do_not_warn_and_the_users_filters_come_back():
    """Zoo ``recall`` (RMSNorm on the native-autograd path): DePass's hooks on ``hook_scale``
    made the bridge warn "output numerics may differ" on every adjoint call. They hold the scale
    at its real value, and the scores still sum to the target (fp32 completeness, checked here
    against the plain forward), so DePass's own runs are silent; the same warning raised by a
    user's code afterwards is shown as before (the filter does not leak)."""
    import warnings

    from depass_lens.adapters.bridge import NORM_PATH_WARNING

    model = dp.zoo.load("recall")
    tokens = random_tokens(model, n_pos=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dp.DePass(model, progress=False).attribute(
            tokens, dp.Logit(3), dp.Heads(), mode="adjoint"
        )
        user = "A forward hook edited hook_scale/hook_normalized (the user's own)"
        warnings.warn(user, stacklevel=1)
    said = [str(w.message) for w in caught]
    assert said == [user], said
    assert NORM_PATH_WARNING.startswith("(") and "hook_scale" in NORM_PATH_WARNING
    with torch.no_grad():
        plain = model(tokens)[:, -1, 3].double()
    total = result.scores.double()[..., result.starts[0]].flatten(1).sum(-1)
    assert float((total - plain).abs().max() / plain.abs().max()) <= tolerance(torch.float32)
