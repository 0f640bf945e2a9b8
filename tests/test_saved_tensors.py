"""Autograd keeps parameters, not their layout copies: the recipes rebuild them exactly, a
linearised forward stores TransformerLens 3's weight copies as recipes, and the scores do not
change."""

from __future__ import annotations

import gc
import weakref
from contextlib import nullcontext

import einops
import pytest
import torch

import depass_lens as dp
from depass_lens import adjoint, difference, saved_tensors
from depass_lens.circuits import build
from depass_lens.saved_tensors import MIN_ELEMENTS, recipe_for
from tests.conftest import AGREEMENT, TL, graph_model, make_model, random_tokens

TARGETS = [dp.Logit(3), dp.LogitDiff(5, 7, pos=-2)]


def _parameter(*shape: int) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(0)
    return torch.nn.Parameter(torch.randn(*shape, generator=gen))


@pytest.mark.parametrize(
    "make",
    [
        lambda w: w.mT.contiguous(),  # TransformerLens 3's gated MLPs (``W.T``: 2-d)
        lambda w: einops.rearrange(w, "h m e -> (h e) m"),  # its attention projections
        lambda w: w.to(torch.float64).transpose(0, 2).contiguous(),  # a cast as DePass uses it
        lambda w: w.permute(2, 0, 1).reshape(w.shape[2], -1).contiguous(),
        # a grouped-query attention's keys per query head, as its projection
        lambda w: einops.rearrange(torch.repeat_interleave(w, 3, dim=0), "h m e -> (h e) m").T,
    ],
)
def test_a_layout_copy_is_rebuilt_exactly(make):
    weight = _parameter(8, 48, 64)
    copy = make(weight)
    recipe = recipe_for(copy)
    assert recipe is not None and recipe.parameter is weight
    rebuilt = recipe.rebuild()
    # data movement only: the same numbers in the same places, so equality is exact
    assert rebuilt.shape == copy.shape and rebuilt.dtype == copy.dtype
    assert torch.equal(rebuilt, copy.detach())


@pytest.mark.parametrize(
    "make",
    [
        lambda w: w * 2,  # arithmetic
        lambda w: w.T,  # a view of the parameter itself: nothing to save
        lambda w: (w + 0).T.contiguous(),  # from a computed tensor, not a parameter
        lambda w: w.detach().T.contiguous(),  # no autograd history
    ],
)
def test_anything_else_is_kept_as_it_is(make):
    assert recipe_for(make(_parameter(8, 48, 64))) is None


def test_small_tensors_are_kept_as_they_are():
    weight = _parameter(4, MIN_ELEMENTS // 8)
    assert recipe_for(weight.T.contiguous()) is None


@pytest.mark.skipif(TL >= 4, reason="TransformerLens 4's bridge multiplies by the parameters")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_linearised_forward_keeps_no_weight_copy(family, monkeypatch):
    """Every attention and MLP weight TransformerLens 3 copies for a matmul is stored as a
    recipe: the recipes cover each block weight's bytes."""
    model = make_model(family, torch.float32, d_model=128, d_mlp=512, d_head=32, n_heads=4)
    covered: dict[int, int] = {}

    def counting(saved):
        stored = saved_tensors.recipe_for(saved)
        if stored is not None:
            covered[id(stored.parameter)] = stored.parameter.numel()
        return stored or saved

    monkeypatch.setattr(saved_tensors, "_pack", counting)
    dp.DePass(model).attribute(random_tokens(model), TARGETS, dp.Heads(), mode="adjoint")
    # TransformerLens 3 multiplies by layout copies in every attention and in gated MLPs (its
    # plain MLP multiplies by the parameters themselves, which autograd keeps at no cost)
    # (a grouped-query attention's ``_W_K``/``_W_V`` are repeated per query head first)
    copied = (".attn.W_",) if family == "gpt2" else (".attn.W_", ".attn._W_", ".mlp.W_")
    block_weights = [
        p
        for name, p in model.named_parameters()
        if any(part in name for part in copied) and p.numel() >= MIN_ELEMENTS
    ]
    assert block_weights
    if family == "llama":
        assert any("._W_K" in name for name, _ in model.named_parameters())
    missing = [p.shape for p in block_weights if id(p) not in covered]
    assert not missing, missing


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("mode", ["heads", "graph", "contrastive"])
def test_scores_do_not_change(family, mode, monkeypatch):
    model = graph_model(family, torch.float64, d_model=128, d_mlp=512, d_head=32, n_heads=4)
    clean = random_tokens(model, batch=2, n_pos=7, seed=1)
    corrupt = random_tokens(model, batch=2, n_pos=7, seed=2)

    def scores():
        depass = dp.DePass(model)
        if mode == "heads":
            return depass.attribute(clean, TARGETS, dp.Heads(), mode="adjoint").scores
        contrast = corrupt if mode == "contrastive" else None
        linearisation = "difference" if TL < 4 or family != "neox" else "clean"
        graph = depass.graph(clean, TARGETS, contrast=contrast, linearisation=linearisation)
        return torch.cat([graph.edge_scores.flatten(), graph.node_scores.flatten()])

    by_reference = scores()
    monkeypatch.setattr(adjoint, "lean_saved_tensors", nullcontext)
    kept = scores()
    scale = float(kept.abs().max())
    assert scale > 0
    assert float((by_reference - kept).abs().max()) / scale <= AGREEMENT[torch.float64]


def test_a_parameter_changed_before_the_backward_pass_is_refused():
    weight = _parameter(8, 48, 64)
    recipe = recipe_for(weight.mT.contiguous())
    assert recipe is not None
    with torch.no_grad():
        weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        recipe.rebuild()


def test_a_copy_of_an_input_leaf_is_kept_as_it_is():
    leaf = torch.randn(8, 48, 64).requires_grad_(True)
    assert recipe_for(leaf.mT.contiguous()) is None


@pytest.mark.skipif(TL >= 4, reason="a bridge's native attention forms its pattern its own way")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["heads", "contrastive"])
def test_frozen_patterns_are_rebuilt_from_the_scores(family, mode, monkeypatch):
    """The QK-aware split and the difference linearisation keep the scores; every layer's
    pattern that TransformerLens's ``pattern @ v`` saves is stored as a recipe on them."""
    model = make_model(family, torch.float32, d_model=64, d_head=16, n_heads=4, n_ctx=72)
    clean = random_tokens(model, batch=2, n_pos=72, seed=1)  # 4 x 72^2 >= MIN_ELEMENTS
    kinds: list[str] = []

    def counting(saved):
        stored = saved_tensors._activation_recipe(saved)
        if stored is not None:
            kinds.append(tuple(saved.shape))
        return saved_tensors.recipe_for(saved) or stored or saved

    monkeypatch.setattr(saved_tensors, "_pack", counting)
    depass = dp.DePass(model, attention="symmetric")
    if mode == "heads":
        depass.attribute(clean, TARGETS, dp.Heads(), mode="adjoint")
    else:
        corrupt = random_tokens(model, batch=2, n_pos=72, seed=2)
        depass.graph(clean, TARGETS, contrast=corrupt)
    assert len(kinds) >= model.cfg.n_layers, kinds


def test_a_recipe_that_does_not_rebuild_its_tensor_is_not_used():
    scores = torch.randn(2, 4, 128, 128)
    pattern = scores.softmax(-1)
    weight = torch.randn(2, 4, 128, 8, requires_grad=True)
    with saved_tensors.lean_saved_tensors():
        saved_tensors.recompute_when_saved(pattern, lambda: (scores * 1.001).softmax(-1))
        assert saved_tensors._activation_recipe(pattern) is None
        saved_tensors.recompute_when_saved(pattern, lambda: scores.softmax(-1))
        assert saved_tensors._activation_recipe(pattern) is not None
        out = (pattern @ weight).sum()
    (grad,) = torch.autograd.grad(out, weight)
    torch.testing.assert_close(grad, pattern.sum(-2, keepdim=True).mT.expand_as(weight))


def test_a_recipes_own_output_is_stored_unchecked_until_it_changes(monkeypatch):
    """``made=True``: the tensor is ``make()``'s output, so storing it calls ``make`` no more;
    once changed in place it is checked again (and, not rebuilt by the recipe, kept)."""
    scores = torch.randn(2, 4, 128, 128)
    calls = []

    def make():
        calls.append(1)
        return scores.softmax(-1)

    weight = torch.randn(2, 4, 128, 8, requires_grad=True)
    with saved_tensors.lean_saved_tensors():
        pattern = saved_tensors.recompute_when_saved(make(), make, made=True)
        assert saved_tensors._activation_recipe(pattern) is not None
        assert len(calls) == 1  # not rebuilt to be checked
        out = (pattern @ weight).sum()
        pattern.mul_(2)  # after registration: the check runs, and the recipe is refused
        assert saved_tensors._activation_recipe(pattern) is None
        assert len(calls) == 2
    (grad,) = torch.autograd.grad(out, weight)  # stored before the change: rebuilt unchanged
    torch.testing.assert_close(grad, (pattern / 2).sum(-2, keepdim=True).mT.expand_as(weight))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_corrupted_run_keeps_scores_not_patterns(family, monkeypatch):
    """The difference linearisation rebuilds the corrupted run's patterns from its scores: every
    layer's is dropped where it is softmax of its scores bit for bit, and the graph is the one
    built on the stored patterns."""
    model = graph_model(family, torch.float64)
    clean = random_tokens(model, batch=2, n_pos=7, seed=1)
    corrupt = random_tokens(model, batch=2, n_pos=7, seed=2)
    dropped: list[int] = []

    def recording(adapter, reference):
        before = len(reference)
        difference.drop_rebuildable_patterns(adapter, reference)
        dropped.append(before - len(reference))

    monkeypatch.setattr(build, "drop_rebuildable_patterns", recording)
    graph = dp.DePass(model).graph(clean, TARGETS, contrast=corrupt)
    if TL < 4:  # TransformerLens 3's pattern is exactly softmax of hook_attn_scores
        assert dropped == [model.cfg.n_layers]
    monkeypatch.setattr(build, "drop_rebuildable_patterns", lambda adapter, reference: None)
    stored = dp.DePass(model).graph(clean, TARGETS, contrast=corrupt)
    scale = float(stored.edge_scores.abs().max())
    error = float((graph.edge_scores - stored.edge_scores).abs().max()) / scale
    assert error <= AGREEMENT[torch.float64]


@pytest.mark.parametrize("mode", ["heads", "contrastive"])
def test_the_linearised_pass_is_freed_after_the_call(mode, monkeypatch):
    """Nothing autograd saved outlives the call: a pack hook that handed autograd back a saved
    output itself would tie it to its own grad_fn (a cycle no collector sees), and every call
    would leak its whole pass."""
    model = graph_model("gpt2", torch.float32)
    clean = random_tokens(model, batch=2, n_pos=7, seed=1)
    corrupt = random_tokens(model, batch=2, n_pos=7, seed=2)
    original = saved_tensors._pack
    refs: list[weakref.ref] = []

    def recording(saved):
        if saved.grad_fn is not None:  # activations, not parameters or inputs
            refs.append(weakref.ref(saved))
        return original(saved)

    monkeypatch.setattr(saved_tensors, "_pack", recording)
    depass = dp.DePass(model)
    if mode == "heads":
        depass.attribute(clean, TARGETS, dp.Heads(), mode="adjoint")
    else:
        depass.graph(clean, TARGETS, contrast=corrupt)
    gc.collect()
    assert refs
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} saved activations outlived the call"
