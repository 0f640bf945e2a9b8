"""TransformerLens 4: DePass on ``TransformerBridge.boot_transformers`` models of real HF code.

The checkpoints are random HF models written to a temporary folder by the test itself
(tests/hf_checkpoints.py), so the real HF module code (GPT-2, GPT-NeoX, LLaMA with GQA, Qwen2,
Gemma) runs, offline. Checked: the bridge computes the HF model; the decomposition is lossless at
every hook (float32 1e-5; float64 1e-10 where the model is float64 throughout); adjoint mode ==
forward mode; at the last layer DePass equals TransformerLens 4's own direct logit attribution.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.decomposition import relative_error, tolerance
from tests.conftest import TL, TL4_ONLY
from tests.hf_checkpoints import HF_FAMILIES, hf_model, write_checkpoint

pytestmark = pytest.mark.skipif(TL < 4, reason=TL4_ONLY)
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return {family: write_checkpoint(family, folder) for family in HF_FAMILIES}


def boot(path, dtype=torch.float32, float64_norms: bool = False):
    """The checkpoint as a bridge; ``float64_norms`` runs its RMS norms on the bridge's own
    float64 path (HF's RMSNorm computes in float32 whatever the dtype)."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=dtype)
    if float64_norms:
        for module in bridge.modules():
            if getattr(module, "uses_rms_norm", False) and hasattr(module, "hook_scale"):
                module.use_native_layernorm_autograd = False
    return bridge.eval()


def tokens_for(bridge, batch: int = 2, n_pos: int = 9):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, bridge.cfg.d_vocab, (batch, n_pos), generator=gen)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_bridge_computes_the_hf_model(checkpoints, family):
    bridge = boot(checkpoints[family])
    tokens = tokens_for(bridge)
    with torch.no_grad():
        expected = hf_model(family)(tokens).logits
        dp.DePass(bridge)  # turns compatibility mode on: hooks added, function unchanged
        got = bridge(tokens)
    assert bridge.compatibility_mode
    assert relative_error(got.unsqueeze(1), expected) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("rule", ["taylor", "softmax"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_lossless_at_every_hook(checkpoints, family, rule, dtype):
    exact = dtype == torch.float64
    bridge = boot(checkpoints[family], dtype, float64_norms=exact)
    depass = dp.DePass(bridge)
    tokens = tokens_for(bridge)
    logits, cache = bridge.run_with_cache(tokens)
    result = depass.run(tokens, cache=cache, rule=rule, names_filter=lambda n: True)
    errors = result.check_lossless(cache)
    assert {"blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"} <= set(
        errors
    )
    assert depass.adapter.precision(dtype) == dtype  # float64 norms: float64 throughout
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance(dtype), (worst, errors[worst])
    assert relative_error(result.logits(), logits) <= tolerance(dtype)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_float32_rms_norms_bound_float64_precision(checkpoints, family):
    """HF's RMSNorm computes in float32: in float64 the adapter reports float32 precision and
    DePass stays within it (and its own check does not refuse the run)."""
    bridge = boot(checkpoints[family], torch.float64)
    depass = dp.DePass(bridge)
    assert depass.adapter.precision(torch.float64) == torch.float32
    tokens = tokens_for(bridge)
    _, cache = bridge.run_with_cache(tokens)
    errors = depass.run(tokens, cache=cache).check_lossless(cache)
    assert 1e-10 < max(errors.values()) <= 1e-5


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_adjoint_equals_forward(checkpoints, family):
    bridge = boot(checkpoints[family])
    depass = dp.DePass(bridge)
    tokens = tokens_for(bridge)
    for source in (dp.Tokens(), dp.Heads(), dp.Neurons(layer=[0, 1])):
        adjoint = depass.attribute(tokens, dp.LogitDiff(3, 5), source, mode="adjoint")
        forward = depass.attribute(tokens, dp.LogitDiff(3, 5), source, mode="forward")
        gap = (adjoint.scores - forward.scores).abs().max() / forward.scores.abs().max()
        # two association orders of one fp32 linear map: see AGREEMENT in test_agreement.py
        assert gap <= tolerance(torch.float32), (source, float(gap))


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_last_layer_equals_transformerlens_dla(checkpoints, family):
    """DePass heads and neurons of the last layer == TL 4's ``stack_head_results`` /
    ``stack_neuron_results`` with ``apply_ln`` (an implementation we did not write)."""
    bridge = boot(checkpoints[family], torch.float64, float64_norms=True)
    depass = dp.DePass(bridge)
    tokens = tokens_for(bridge)
    _, cache = bridge.run_with_cache(tokens)
    last = bridge.cfg.n_layers - 1
    direction = bridge.tokens_to_residual_directions(torch.tensor(3))
    direction = direction * depass.adapter.final_norm().w
    heads = depass.attribute(tokens, dp.Logit(3), dp.Heads(last), cache=cache, mode="forward")
    stack = cache.stack_head_results(layer=last + 1, pos_slice=-1, apply_ln=True)
    tl_heads = (stack[-bridge.cfg.n_heads :] @ direction).T
    if depass.adapter.parallel:  # NeoX: heads write straight into the last resid_post
        torch.testing.assert_close(heads.heads()[:, 0, 0], tl_heads, rtol=1e-9, atol=1e-10)
    neurons = depass.attribute(tokens, dp.Logit(3), dp.Neurons(last), mode="adjoint")
    stack = cache.stack_neuron_results(layer=last + 1, pos_slice=-1, apply_ln=True)
    tl_neurons = (stack[-bridge.cfg.d_mlp :] @ direction).T
    torch.testing.assert_close(neurons.neurons(last)[:, 0], tl_neurons, rtol=1e-9, atol=1e-10)
