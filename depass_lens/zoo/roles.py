"""Attention-pattern roles of every head (previous-token, induction, duplicate-token).

Ablation says *which* heads matter; these scores say *what* they do. They use TransformerLens's own
``head_detector.detect_head`` on random token sequences repeated once, the standard probe for
induction circuits: a head's score is the fraction of its attention that falls where the role
predicts (1.0 = all of it; an induction head can reach about 0.5, since only the second copy has
an earlier occurrence to look back to).
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from transformer_lens.head_detector import detect_head

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel

Role = Literal["previous_token_head", "induction_head", "duplicate_token_head"]
ROLES: tuple[Role, ...] = ("previous_token_head", "induction_head", "duplicate_token_head")


@torch.no_grad()
def head_role_scores(
    model: TLModel, words: list[str], n_sequences: int = 32, seed: int = 0
) -> dict[str, list[list[float]]]:
    """``role -> [layer][head]`` mean detector score over repeated random word sequences."""
    rng = random.Random(f"roles-{seed}")
    half = (make_adapter(model).n_ctx - 1) // 2  # BOS + two copies fit the context
    sequences = []
    for _ in range(n_sequences):
        seq = [rng.choice(words) for _ in range(half)]
        sequences.append(" ".join(seq + seq))
    return {
        role: torch.stack([detect_head(model, s, role, exclude_bos=True) for s in sequences])
        .mean(0)
        .tolist()
        for role in ROLES
    }


def heads_with_role(
    scores: dict[str, list[list[float]]], role: str, threshold: float = 0.3
) -> list[tuple[str, float]]:
    """Heads whose ``role`` score exceeds ``threshold``, strongest first."""
    found = [
        (f"L{layer}H{head}", value)
        for layer, row in enumerate(scores[role])
        for head, value in enumerate(row)
        if value > threshold
    ]
    return sorted(found, key=lambda item: -item[1])
