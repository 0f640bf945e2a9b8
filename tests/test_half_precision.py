"""bfloat16 and float16 models: every mode, target and split works and agrees with float32.

Each half-precision model is the float32 model cast (``model.to(dtype)``: the same weights,
rounded), so their scores differ by the half model's own rounding and nothing else.

Tolerances come from the dtype's ``eps`` (bf16 ``2^-7``, fp16 ``2^-10``). Every sublayer of the
half model rounds its output and the residual sum to ``eps / 2`` of their size, so its
activations (and logits) are a few ``eps`` from float32's: measured 0.6 to 3.6 eps on 3 to 12
layers (``benchmarks/results/half_precision.md``). DePass adds no error of its own beyond
float32's (it propagates in float32), so scores relative to their largest agree to
``tolerance(dtype) = 8 eps`` (:data:`~depass_lens.decomposition.HALF_GROWTH`), losslessness
against the half model's own activations holds to the same bound, and forward mode's
completeness (a float32 sum) to float32's ``1e-5``. Adjoint mode's gradients are the half
model's own backward pass, so its completeness is again ``8 eps``. A contrastive graph scores
*changes* between two runs, each rounded on its own: twice the bound.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.decomposition import HALF_GROWTH, check_lossless, tolerance
from depass_lens.errors import LosslessnessError
from depass_lens.frozen import FrozenActivations
from depass_lens.propagate import PropagationContext
from depass_lens.qk import AttentionSplit
from depass_lens.rules import get_rule
from tests.conftest import TL, graph_model, make_model, random_tokens

pytestmark = pytest.mark.numerics  # also run under test.sh's second math configuration

HALF = [torch.bfloat16, torch.float16]
IDS = ["bf16", "fp16"]
TARGET = dp.LogitDiff(5, 11)
_MODELS: dict[tuple[str, torch.dtype], object] = {}


def model_pair(family: str, dtype: torch.dtype):
    """The float32 model of ``family`` and the same weights cast to ``dtype`` (built once; the
    builders are seeded, and a used TransformerBridge cannot be deep-copied)."""
    maker = graph_model if family == "gpt2" else make_model
    for key in (torch.float32, dtype):
        if (family, key) not in _MODELS:
            _MODELS[family, key] = maker(family, torch.float32).to(key)
    return _MODELS[family, torch.float32], _MODELS[family, dtype]


def gap(half: torch.Tensor, full: torch.Tensor) -> float:
    """``max |half - full| / max |full|``, in float64."""
    half, full = half.detach().double(), full.detach().double()
    return float((half - full).abs().max() / full.abs().max())


def completeness(result: dp.Attribution) -> float:
    """How far the first start point's scores are from summing to the target, relative to them."""
    scores = result.scores.double()
    total = scores[..., result.starts[0]].sum(-1)
    return float((total - result.target_values.double()).abs().max() / scores.abs().max())


def test_tolerances_follow_the_dtypes_eps():
    for dtype in HALF:
        assert tolerance(dtype) == HALF_GROWTH * torch.finfo(dtype).eps
    real = torch.randn(1, 4, 8).to(torch.bfloat16)
    off = real.float().unsqueeze(1) * (1 + 4 * torch.finfo(torch.bfloat16).eps)
    # float32 components of a bf16 state: the bf16 state's rounding bounds the check, not float32
    check_lossless(off, real, "test", precision=torch.float32)
    with pytest.raises(LosslessnessError):  # but no further
        check_lossless(real.float().unsqueeze(1) * 1.1, real, "test", precision=torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_forward_mode_with_the_default_split(dtype):
    """The issue's call: ``attribute(..., mode="forward")`` with the default (symmetric) split."""
    full, half = model_pair("gpt2", dtype)
    tokens = random_tokens(full)
    depass = dp.DePass(half, progress=False)
    assert depass.attention.side == "symmetric"
    got = depass.attribute(tokens, TARGET, [dp.Tokens(), dp.Heads()], mode="forward")
    want = dp.DePass(full, progress=False).attribute(
        tokens, TARGET, [dp.Tokens(), dp.Heads()], mode="forward"
    )
    assert got.scores.dtype == torch.float32  # propagated and read out in float32
    assert gap(got.scores, want.scores) <= tolerance(dtype)
    assert completeness(got) <= tolerance(torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_adjoint_mode_agrees_with_float32(dtype):
    full, half = model_pair("gpt2", dtype)
    tokens = random_tokens(full)
    got = dp.DePass(half, progress=False).attribute(tokens, TARGET, dp.Heads(), mode="adjoint")
    want = dp.DePass(full, progress=False).attribute(tokens, TARGET, dp.Heads(), mode="adjoint")
    assert gap(got.scores, want.scores) <= tolerance(dtype)
    assert completeness(got) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_run_is_lossless_to_the_half_tolerance(dtype):
    """``run()`` on a LLaMA-style model (rotary, RMSNorm, grouped-query attention, gated MLP):
    the float32 components sum to the half model's own activations at every hook."""
    full, half = model_pair("llama", dtype)
    tokens = random_tokens(full)
    _, cache = half.run_with_cache(tokens)
    result = dp.DePass(half, progress=False).run(tokens, cache=cache, names_filter=lambda n: True)
    errors = result.check_lossless(cache)
    assert {"blocks.2.hook_resid_post", "blocks.1.attn.hook_pattern"} <= set(errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance(dtype), (worst, errors[worst])
    logits = result.logits()[:, :, -1].sum(1)
    assert gap(logits, full(tokens)[:, -1]) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_hidden_state_and_attention_score_targets(dtype):
    full, half = model_pair("llama", dtype)
    tokens = random_tokens(full)
    targets = [dp.HiddenState("blocks.1.hook_resid_post"), dp.AttentionScore(2, 1, -1, 3)]
    for target in targets:
        got = dp.DePass(half, progress=False).attribute(tokens, target, mode="forward")
        want = dp.DePass(full, progress=False).attribute(tokens, target, mode="forward")
        assert gap(got.scores, want.scores) <= tolerance(dtype), target
        assert completeness(got) <= tolerance(torch.float32), target


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_integrated_softmax_is_not_refined_past_the_rounding(dtype):
    """The half model's pattern is rounded to ``eps / 2``, which no quadrature reaches: the
    integrated softmax integrates to the float32 softmax of its scores (as many nodes as for the
    float32 model) and the rounding joins the remainder, so ``U + M(s) + remainder`` is still
    the model's pattern."""
    nodes = {}
    for model in model_pair("gpt2", dtype):
        tokens = random_tokens(model)
        adapter = dp.DePass(model).adapter
        _, cache = model.run_with_cache(tokens)
        frozen = FrozenActivations(adapter, cache, tokens)
        ctx = PropagationContext(
            adapter, frozen, get_rule("taylor"), attention=AttentionSplit("pattern")
        )
        real, integrated = ctx.qk(1)
        assert integrated is not None
        nodes[model.cfg.dtype] = integrated.n_nodes
        moved = integrated.apply(real.scores.unsqueeze(1).where(real.allowed.unsqueeze(1), 0.0))
        rebuilt = integrated.uniform + moved[:, 0] + integrated.remainder
        pattern = cache["blocks.1.attn.hook_pattern"]
        assert gap(rebuilt, pattern.float()) <= tolerance(torch.float32)
    assert nodes[dtype] <= nodes[torch.float32]


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_graphs_agree_with_float32(dtype):
    """Absolute and contrastive circuit graphs (the contrastive one's secants in float32: a
    central difference of step ``1e-4`` vanishes in bfloat16)."""
    full, half = model_pair("gpt2", dtype)
    tokens = random_tokens(full, n_pos=8)
    corrupt = random_tokens(full, n_pos=8, seed=7)
    for contrast, bound in ((None, 1.0), (corrupt, 2.0)):
        got = dp.DePass(half, progress=False).graph(tokens, TARGET, contrast=contrast)
        want = dp.DePass(full, progress=False).graph(tokens, TARGET, contrast=contrast)
        assert gap(got.edge_scores, want.edge_scores) <= bound * tolerance(dtype)
        assert max(got.conservation().values()) <= bound * tolerance(dtype)


def test_the_cast_model_is_half_precision():
    """``model.to(dtype)`` casts a HookedTransformer (TL 3) and a TransformerBridge (TL 4)."""
    _, half = model_pair("gpt2", torch.bfloat16)
    assert dp.DePass(half).adapter.dtype == torch.bfloat16
    if TL < 4:
        assert half.cfg.dtype == torch.bfloat16
