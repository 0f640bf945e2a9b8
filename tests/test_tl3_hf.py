"""TransformerLens 3: DePass on the same random HF checkpoints as tests/test_bridge_hf.py, loaded
through TransformerLens's own config and weight conversion (what ``from_pretrained`` runs), with
and without weight processing (folded norms, centred writing weights and unembedding)."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.decomposition import relative_error, tolerance
from tests.conftest import TL, TL3_ONLY
from tests.hf_checkpoints import HF_FAMILIES, hf_model, tl3_model, write_checkpoint

pytestmark = pytest.mark.skipif(TL >= 4, reason=TL3_ONLY)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return {family: write_checkpoint(family, folder) for family in HF_FAMILIES}


def _centred(logits: torch.Tensor) -> torch.Tensor:
    """Logits up to a per-position constant (centring the unembedding shifts them)."""
    return logits - logits.mean(-1, keepdim=True)


@pytest.mark.parametrize("process", [False, True], ids=["raw", "processed"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_conversion_computes_the_hf_model(checkpoints, family, process):
    model = tl3_model(family, checkpoints[family], torch.float32, process)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _centred(hf_model(family)(tokens).logits)
        got = _centred(model(tokens))
    assert relative_error(got.unsqueeze(1), expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("process", [False, True], ids=["raw", "processed"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_lossless_and_adjoint_equals_forward(checkpoints, family, process, dtype):
    model = tl3_model(family, checkpoints[family], dtype, process)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    depass = dp.DePass(model)
    errors = depass.run(tokens, cache=cache, names_filter=lambda n: True).check_lossless(cache)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance(dtype), (worst, errors[worst])
    for source in (dp.Tokens(), dp.Heads(), dp.Neurons(layer=[0, 1])):
        adjoint = depass.attribute(tokens, dp.LogitDiff(3, 5), source, mode="adjoint").scores
        forward = depass.attribute(tokens, dp.LogitDiff(3, 5), source, mode="forward").scores
        gap = float((adjoint - forward).abs().max() / forward.abs().max())
        assert gap <= (1e-6 if dtype == torch.float32 else 1e-10), (source, gap)
