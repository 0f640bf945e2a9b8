"""Batches with padding, start layers, positions, and every source/target combination."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from tests.conftest import make_model, make_text_model, random_tokens


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_leaks(family, side):
    """A padded prompt gets the same scores as alone; pad components score exactly 0."""
    model = make_model(family, torch.float64)
    long, short = random_tokens(model, batch=2, n_pos=8, seed=4)
    short = short[:5]
    pad = torch.zeros(3, dtype=torch.long)
    padded_short = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    tokens = torch.stack([long, padded_short])
    mask = torch.ones_like(tokens)
    if side == "left":
        mask[1, :3] = 0
    else:
        mask[1, 5:] = 0
    depass = dp.DePass(model)
    for mode in ("forward", "adjoint"):
        batched = depass.attribute(tokens, dp.Logit(6), dp.Tokens(), mode=mode, attention_mask=mask)
        alone = depass.attribute(short.unsqueeze(0), dp.Logit(6), dp.Tokens(), mode=mode)
        real = slice(3, 8) if side == "left" else slice(0, 5)
        pads = [0, 1, 2] if side == "left" else [5, 6, 7]
        torch.testing.assert_close(batched.tokens()[1, 0, real], alone.tokens()[0, 0])
        assert batched.tokens()[1, 0, pads].abs().max() == 0
        torch.testing.assert_close(batched.target_values[1], alone.target_values[0])


def test_string_batch_is_padded_and_positions_are_per_prompt():
    model = make_text_model()
    depass = dp.DePass(model)
    prompts = ["When Mary and John went to the store", "Mary went"]
    batched = depass.attribute(prompts, dp.LogitDiff("Mary", "John"))
    for row, prompt in enumerate(prompts):
        alone = depass.attribute(prompt, dp.LogitDiff("Mary", "John"))
        n = alone.scores.shape[-1] - 1
        torch.testing.assert_close(batched.tokens()[row, 0, :n], alone.tokens()[0, 0])
        torch.testing.assert_close(batched.target_values[row], alone.target_values[0])


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "attn_only"])
def test_every_start_layer_is_lossless(family):
    model = make_model(family, torch.float64)
    tokens = random_tokens(model)
    _, cache = model.run_with_cache(tokens)
    depass = dp.DePass(model)
    for layer in range(model.cfg.n_layers):
        for source in (dp.Tokens(layer=layer), dp.Heads(layer), dp.Modules(layer)):
            res = depass.run(tokens, source, cache=cache)
            errors = res.check_lossless(cache)
            assert errors and max(errors.values()) <= 1e-10, (source, errors)


def test_targets_are_consistent():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    depass = dp.DePass(model)
    a, b = dp.Logit(4), dp.Logit(9)
    both = depass.attribute(tokens, [a, b, dp.LogitDiff(4, 9)], dp.Heads())
    torch.testing.assert_close(both.scores[:, 2], both.scores[:, 0] - both.scores[:, 1])
    logits = model(tokens)[:, -1].detach()
    torch.testing.assert_close(both.target_values[:, 0], logits[:, 4])
    # Direction on W_U's column equals the logit minus its bias
    direction = dp.Direction(model.W_U[:, 4].detach())
    dir_scores = depass.attribute(tokens, direction, dp.Tokens())
    logit_scores = depass.attribute(tokens, a, dp.Tokens())
    torch.testing.assert_close(dir_scores.tokens(), logit_scores.tokens())


def test_hidden_state_target_forward_and_adjoint():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    target = dp.HiddenState("blocks.1.hook_resid_post", pos=-2)
    auto = depass.attribute(tokens, target, dp.Tokens())
    assert auto.mode == "forward"  # 10 components < 32 scalar targets
    adjoint = depass.attribute(tokens, target, dp.Tokens(), mode="adjoint")
    torch.testing.assert_close(auto.scores, adjoint.scores)
    _, cache = model.run_with_cache(tokens)
    real = cache["blocks.1.hook_resid_post"][0, -2]
    torch.testing.assert_close(auto.scores.sum(-1)[0], real)


def test_auto_mode_rule():
    model = make_model("gpt2")
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    assert depass.attribute(tokens, dp.Logit(1), dp.Heads()).mode == "adjoint"
    assert depass.attribute(tokens, dp.Logit(1), dp.Heads(), rule="softmax").mode == "forward"
    few = dp.Modules(2)  # 4 components < 32 targets
    assert (
        depass.attribute(tokens, dp.HiddenState("blocks.2.hook_resid_post"), few).mode == "forward"
    )
    many = dp.Neurons(0)  # 50 components > 32 targets
    assert (
        depass.attribute(tokens, dp.HiddenState("blocks.2.hook_resid_post"), many).mode == "adjoint"
    )


def test_subspace_source_splits_by_projection():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    basis = torch.randn(2, 32, dtype=torch.float64)
    depass = dp.DePass(model)
    res = depass.run(tokens, dp.Subspace(1, basis))
    start = res["blocks.1.hook_resid_pre"][0]
    q, _ = torch.linalg.qr(basis.T)
    torch.testing.assert_close(start[0], start[0] @ q @ q.T)  # inside the subspace
    torch.testing.assert_close(start[1] @ q, torch.zeros_like(start[1] @ q))  # orthogonal rest
    with pytest.raises(dp.DePassInputError, match="orthogonal"):
        depass.run(tokens, dp.Subspace(1, {"a": basis, "b": basis[:1] + 0.1}))
    two = {"a": q.T[:1], "b": q.T[1:]}
    res2 = depass.run(tokens, dp.Subspace(1, two))
    torch.testing.assert_close(res2["unembed.hook_in"][:, :2].sum(1), res["unembed.hook_in"][:, 0])


def test_tokens_with_separate_positions():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    depass = dp.DePass(model)
    sep = depass.attribute(tokens, dp.Logit(2), dp.Tokens(pos_embed="separate"))
    assert [lab.kind for lab in sep.labels][-2:] == ["pos_embed", "bias"]
    joint = depass.attribute(tokens, dp.Logit(2), dp.Tokens())
    torch.testing.assert_close(sep.scores.sum(-1), joint.scores.sum(-1))


def test_attribution_helpers():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=1)
    attr = dp.DePass(model).attribute(tokens, dp.Logit(2), dp.Heads())
    assert attr.heads().shape == (1, 1, 3, 4)
    top = attr.top(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[1][1])
    records = attr.to_records()
    assert len(records) == attr.scores.numel() and records[0]["kind"] == "head"


def test_target_names_label_results():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    depass = dp.DePass(model)
    targets = [
        dp.LogitDiff([4, 5], [9, 9]),  # one correct token per prompt, one wrong token for all
        dp.LogitDiff(4, 9, name="IO - S"),
        dp.Logit(torch.tensor([1, 2])),
    ]
    names = depass.attribute(tokens, targets, dp.Heads()).target_names
    assert names == ["logit(correct) - logit(#9)", "IO - S", "logit(target)"]
