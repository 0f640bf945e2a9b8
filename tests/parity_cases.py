"""What the cross-version parity fixtures hold: models, inputs and the scores compared.

``scripts/write_parity_fixtures.py`` computes these scores under TransformerLens 3.x
(``HookedTransformer`` from TL 3's own HF weight conversion, unprocessed; zoo models as shipped)
and stores them, with the HF weights, in ``tests/fixtures/parity/``; ``tests/test_parity.py``
recomputes them under TransformerLens 4.x on ``TransformerBridge`` models of the same weights
(``boot_transformers`` on the HF checkpoint, ``boot_native`` for the zoo) and compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import depass_lens as dp

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
#: zoo models checked (boot_native under TL 4) and the dtypes checked for each.
ZOO = {"ioi": (torch.float32, torch.float64), "recall": (torch.float32,)}
DTYPES = {torch.float32: "fp32", torch.float64: "fp64"}


def parity_tokens(d_vocab: int, batch: int = 2, n_pos: int = 8) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, n_pos), generator=torch.Generator().manual_seed(7))


def parity_scores(model: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token, head, neuron and QK-score attributions (the wrapper's defaults: taylor rule,
    QK-aware symmetric split, adjoint mode), each ``batch target comp``."""
    depass = dp.DePass(model)
    last = depass.adapter.n_layers - 1
    cases = {
        "tokens": (dp.Logit(3), dp.Tokens()),
        "heads": (dp.LogitDiff(3, 5), dp.Heads()),
        "qk_tokens": (dp.AttentionScore(last, 0, -1, 2), dp.Tokens()),
    }
    if not depass.adapter.attn_only:
        cases["neurons"] = (dp.Logit(3), dp.Neurons(layer=[0, last]))
    return {
        name: depass.attribute(tokens, target, source).scores.detach().cpu()
        for name, (target, source) in cases.items()
    }


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|got - expected| / max|expected|``."""
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())
