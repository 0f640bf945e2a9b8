"""The same invariants on a CUDA device: losslessness, adjoint == forward, CUDA == CPU.

Skipped where no GPU is present (as in CI); run with ``pytest tests/test_cuda.py`` on a GPU machine.
Kernels, reduction orders and the memory budget differ from the CPU path, so this is the check that
nothing in the engine silently assumes the CPU.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from tests.conftest import AGREEMENT, FAMILIES, make_model, random_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _on_cuda(family: str, dtype: torch.dtype):
    model = make_model(family, dtype).to(CUDA)
    return model, random_tokens(model).to(CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rule", ["taylor", "softmax", "linear"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lossless_on_cuda(family, rule, dtype):
    model, tokens = _on_cuda(family, dtype)
    _, cache = model.run_with_cache(tokens)
    result = dp.DePass(model).run(tokens, cache=cache, rule=rule, names_filter=lambda n: True)
    assert result["unembed.hook_in"].device.type == CUDA.type
    errors = result.check_lossless(cache)
    assert errors and max(errors.values()) <= TOLERANCE[dtype], max(errors, key=errors.get)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adjoint_equals_forward_on_cuda(family):
    model, tokens = _on_cuda(family, torch.float32)
    depass = dp.DePass(model)
    sources = [dp.Tokens(), dp.Heads(), dp.Modules()]
    if not model.cfg.attn_only and not model.cfg.num_experts:
        sources.append(dp.Neurons())
    target = [dp.Logit(5), dp.LogitDiff(7, 11)]
    forward = depass.attribute(tokens, target, sources, mode="forward")
    adjoint = depass.attribute(tokens, target, sources, mode="adjoint")
    gap = float((adjoint.scores - forward.scores).abs().max() / forward.scores.abs().max())
    assert gap <= AGREEMENT[torch.float32], gap


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "moe"])
def test_cuda_matches_cpu(family):
    """fp64 scores on the GPU equal those on the CPU: the engine is device-agnostic."""
    cpu_model = make_model(family, torch.float64)
    tokens = random_tokens(cpu_model)
    gpu_model = make_model(family, torch.float64).to(CUDA)
    for mode, rule in (("forward", "softmax"), ("adjoint", "taylor")):
        sources = [dp.Tokens(), dp.Heads()]
        cpu = dp.DePass(cpu_model, rule=rule).attribute(tokens, dp.Logit(3), sources, mode=mode)
        gpu = dp.DePass(gpu_model, rule=rule).attribute(
            tokens.to(CUDA), dp.Logit(3), sources, mode=mode
        )
        torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-10, atol=1e-10)


def test_memory_budget_chunks_on_cuda():
    """A small budget forces chunking on the GPU and changes nothing but memory."""
    model, tokens = _on_cuda("llama", torch.float64)
    whole = dp.DePass(model, rule="softmax")
    tight = dp.DePass(model, rule="softmax", memory_budget=4 * 1024)
    prepared = tight.prepare(tokens)
    assert tight._chunk(prepared, tokens.shape[1] + 1) < tokens.shape[1] + 1
    assert whole._chunk(prepared, tokens.shape[1] + 1) == tokens.shape[1] + 1
    a, b = whole.run(tokens), tight.run(tokens)
    torch.testing.assert_close(a["unembed.hook_in"], b["unembed.hook_in"], rtol=1e-10, atol=1e-10)


def test_zoo_model_on_cuda():
    from depass_lens import zoo

    model = zoo.load("ioi", device="cuda")
    prompt = "When Mary and John went to the store , John gave a drink to"
    attribution = dp.DePass(model).attribute(prompt, dp.LogitDiff("Mary", "John"), dp.Heads())
    logits = model(prompt)[0, -1]
    value = logits[model.to_single_token("Mary")] - logits[model.to_single_token("John")]
    assert len(attribution.starts) == model.cfg.n_layers  # one start point per layer
    for start in attribution.starts:  # each layer's heads + rest + bias add up to the target
        total = attribution.scores[0, 0, start].sum()
        torch.testing.assert_close(total, value.detach(), rtol=1e-4, atol=1e-4)
