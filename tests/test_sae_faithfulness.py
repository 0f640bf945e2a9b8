"""Feature-level faithfulness machinery: the ablation ground truth, the baselines and the table."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.evaluation import sae_faithfulness as F
from tests.conftest import TL, make_model, random_tokens
from tests.sae_helpers import make_sae


def _setup():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=3)
    sae = make_sae(model, "resid_mid", layer=1, d_sae=24)
    answers, wrong = torch.tensor([3, 5, 7]), torch.tensor([4, 6, 8])
    return model, tokens, sae, answers, wrong


@pytest.mark.skipif(
    TL >= 4,
    reason="freezing norms, patterns and MLP ratios by hooks on a TransformerBridge leaves a gap "
    "to the DePass share (0.8 relative, measured; the frozen model is linear there too): the "
    "bridge's hook semantics for this diagnostic are not yet understood",
)
def test_frozen_ablation_equals_minus_depass_share():
    """On the frozen-linearised model, removing a latent changes the metric by exactly minus its
    DePass share (value split): checks the ablation hooks and DePass against each other."""
    model, tokens, sae, answers, wrong = _setup()
    s = F.setup(model, sae, tokens)
    metric = F.logit_diff_metric(answers, wrong)
    effect = F.ablation_effects(s, metric, freeze="all")
    share = F.depass_scores(s, dp.LogitDiff(answers, wrong), attention="value")
    assert len(s.latents) >= 5
    assert float((effect + share).abs().max() / share.abs().max()) <= 1e-8
    real = F.ablation_effects(s, metric)  # the real model differs: the check can fail
    assert float((real + share).abs().max() / share.abs().max()) > 1e-3


def test_integrated_gradients_complete():
    """IG's latent scores add up to metric(clean) - metric(all latents off), as IG must."""
    model, tokens, sae, answers, wrong = _setup()
    s = F.setup(model, sae, tokens)
    metric = F.logit_diff_metric(answers, wrong)
    steps = 64
    ig = F.gradient_scores(s, metric, [(i + 0.5) / steps for i in range(steps)])
    delta = -s.contribution(torch.arange(len(s.latents)))
    with torch.no_grad():
        clean = metric(model(tokens))
        off = metric(
            model.run_with_hooks(tokens, fwd_hooks=[(s.placement.hook_out, F._edit_hook(s, delta))])
        )
    torch.testing.assert_close(ig.sum(-1), clean - off, rtol=1e-3, atol=1e-3)


def test_report_rows_and_table():
    model, tokens, sae, answers, wrong = _setup()
    result = F.sae_faithfulness(model, sae, tokens, answers, wrong, ks=(3,), ig_steps=4)
    assert set(result.rows) == {
        "DePass (symmetric)",
        "DePass (value)",
        "attribution patching",
        "integrated gradients (4 steps)",
        "activation magnitude",
    }
    for name, row in result.rows.items():
        assert -1 <= row["spearman_abs"] <= 1 and 0 <= row["precision@3"] <= 1, name
    assert (
        result.rows["activation magnitude"]["spearman"]
        != result.rows["activation magnitude"]["spearman"]
    )  # NaN: unsigned
    assert set(result.removal) == set(result.rows) | {"single-latent ablation (oracle)"}
    oracle = result.removal["single-latent ablation (oracle)"]
    assert oracle[1] == max(v[1] for v in result.removal.values())  # best single removal
    assert "top-10 removed" in F.removal_table(result)
    text = F.table(result)
    assert "attribution patching" in text and "precision@3" in text and "**" in text
    # perfect agreement with itself
    effect = torch.randn(4, 6, dtype=torch.float64)
    same = F.compare(effect, effect, torch.ones(4, 6, dtype=torch.bool), ks=(2,))
    assert all(abs(v - 1) < 1e-12 for v in same.values())
