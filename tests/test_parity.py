"""Cross-version parity: TransformerLens 4 Bridge models give the scores TransformerLens 3 gave.

The fixtures (tests/fixtures/parity/, written under TL 3 by scripts/write_parity_fixtures.py)
hold random HF checkpoints and the token, head, neuron and QK-score attributions DePass computed
on TL 3's conversion of them, and the same for two zoo models. Here the same weights are loaded
as ``boot_transformers`` (HF) or ``boot_native`` (zoo) bridges and the scores recomputed:
float32 to 1e-5 relative; float64 to 1e-10 where both generations compute the model in float64
(GPT-2 style); rotary families in float64 to 1e-6, because HF and the native model build their
rotary tables in float32 whatever the dtype while TL 3 builds them in float64 (measured: 1e-8 to
2e-7). The zoo's ``recall`` (gated MLP) is compared without neuron scores: the native model has
no slot for TL 3's gated ``b_in`` (added after ``act(gate) * up``), so that bias reaches the
stream through ``b_out`` instead of through the neurons (adapters/native_weights.py); its logits
and every other score agree.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TL, TL4_ONLY
from tests.hf_checkpoints import HF_FAMILIES, write_checkpoint
from tests.parity_cases import DTYPES, FIXTURES, ZOO, parity_scores, relative_difference

pytestmark = pytest.mark.skipif(TL < 4, reason=TL4_ONLY)
ROTARY = {"neox", "llama", "qwen2", "gemma", "recall"}


def tolerance(model: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-5
    return 1e-6 if model in ROTARY else 1e-10


def _fixture(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def _bridge(path, dtype):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=dtype)
    for module in bridge.modules():  # float64 RMS norms on the bridge's own float64 path
        if dtype == torch.float64 and getattr(module, "uses_rms_norm", False):
            module.use_native_layernorm_autograd = False
    return bridge.eval()


def _compare(name: str, model, fixture: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    tag = DTYPES[dtype]
    got = parity_scores(model, fixture["tokens"])
    expected = {k.split(".")[-1]: v for k, v in fixture.items() if k.startswith(f"score.{tag}.")}
    assert set(got) == set(expected)
    if name == "zoo-recall":  # gated b_in moved to b_out (see the module docstring)
        del expected["neurons"]
    return {case: relative_difference(got[case], expected[case]) for case in expected}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_checkpoint_scores_match_transformerlens_3(tmp_path, family, dtype):
    fixture = _fixture(family)
    state = {k.removeprefix("weight."): v for k, v in fixture.items() if k.startswith("weight.")}
    bridge = _bridge(write_checkpoint(family, tmp_path, state=state), dtype)
    gaps = _compare(family, bridge, fixture, dtype)
    assert max(gaps.values()) <= tolerance(family, dtype), gaps


@pytest.mark.parametrize(
    "name,dtype",
    [(name, dtype) for name, dtypes in ZOO.items() for dtype in dtypes],
    ids=[f"{name}-{DTYPES[dtype]}" for name, dtypes in ZOO.items() for dtype in dtypes],
)
def test_zoo_scores_match_transformerlens_3(name, dtype):
    from depass_lens import zoo

    model = zoo.load(name)
    assert type(model).__name__ == "TransformerBridge"
    gaps = _compare(f"zoo-{name}", model.to(dtype), _fixture(f"zoo-{name}"), dtype)
    assert max(gaps.values()) <= tolerance(name, dtype), gaps
