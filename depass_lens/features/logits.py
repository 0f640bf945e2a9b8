"""Which logits a feature graph explains when none is named: circuit-tracer's salient logits."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.errors import DePassInputError
from depass_lens.targets import CenteredLogit


@torch.no_grad()
def top_logit_targets(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "1 pos"],
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> tuple[list[CenteredLogit], list[float]]:
    """The most probable next tokens at the last position, most probable first, up to
    ``max_n_logits`` and cut once their cumulative probability reaches ``desired_logit_prob``
    (circuit-tracer's rule), each as a :class:`~depass_lens.targets.CenteredLogit`, with the
    probabilities (circuit-tracer weights each logit node's influence by them)."""
    if not 0 < desired_logit_prob <= 1:
        raise DePassInputError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    if max_n_logits < 1:
        raise DePassInputError(f"max_n_logits must be >= 1, got {max_n_logits}")
    logits = adapter.model(tokens)[0, -1].float()
    probs = torch.softmax(logits, -1)
    top = probs.topk(min(max_n_logits, probs.numel()))
    cut = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    ids, values = top.indices[:cut].tolist(), top.values[:cut].tolist()
    return [CenteredLogit(i, name=f"logit[{_token(adapter, i)}]") for i in ids], values


def _token(adapter: ModelAdapter, token: int) -> str:
    try:
        return str(adapter.model.to_string([token]))
    except Exception:  # noqa: BLE001 - a model without a tokenizer: the id names the token
        return str(token)


__all__ = ["top_logit_targets"]
