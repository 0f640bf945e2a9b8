"""A batch of task prompts with everything the protocols need: answers, counterfactuals, means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Int
from torch import Tensor

from depass_lens.evaluation.metrics import AnswerMetric, logit_diff_metric, logit_metric


@dataclass
class TaskBatch:
    """Prompts (token ids) and the answer to explain at each prompt's last real token.

    ``wrong_ids`` makes the default metric a logit difference ``answer - wrong`` (else the
    answer's logit); ``corrupted_tokens`` feed attribution/activation patching and
    baseline-relative scores; ``reference_tokens`` give the means for mean-ablation (default: the
    batch itself). ``attention_mask`` marks real tokens (1) and padding (0).
    """

    tokens: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"] | None = None
    corrupted_tokens: Int[Tensor, "batch pos"] | None = None
    attention_mask: Int[Tensor, "batch pos"] | None = None
    reference_tokens: Int[Tensor, "ref pos"] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def metric(self) -> AnswerMetric:
        """Logit difference (with ``wrong_ids``) or answer logit at the last real token."""
        if self.wrong_ids is not None:
            return logit_diff_metric(self.answer_ids, self.wrong_ids, -1)
        return logit_metric(self.answer_ids, -1)

    def inputs(self) -> dict[str, Any]:
        """Keyword arguments every attribution method accepts."""
        return {"attention_mask": self.attention_mask}

    def component_inputs(self) -> dict[str, Any]:
        """Keyword arguments every component method accepts (besides ``level``)."""
        return {
            "attention_mask": self.attention_mask,
            "corrupted_tokens": self.corrupted_tokens,
            "reference_tokens": self.reference_tokens,
        }

    @classmethod
    def from_zoo(cls, batch: Any, reference: Any = None) -> TaskBatch:
        """From a ``depass_lens.zoo`` batch (and optionally a reference batch for the means)."""
        return cls(
            tokens=batch.tokens,
            answer_ids=batch.answers,
            wrong_ids=batch.wrong,
            corrupted_tokens=batch.corrupted,
            reference_tokens=None if reference is None else reference.tokens,
        )

    # Short aliases (the names zoo batches use).
    @property
    def answers(self) -> Tensor:
        return self.answer_ids

    @property
    def wrong(self) -> Tensor | None:
        return self.wrong_ids

    @property
    def corrupted(self) -> Tensor | None:
        return self.corrupted_tokens

    @property
    def reference(self) -> Tensor | None:
        return self.reference_tokens

    def target(self) -> Any:
        """The matching DePass target (imports the engine on first use)."""
        import depass_lens as dp  # noqa: PLC0415

        if self.wrong_ids is not None:
            return dp.LogitDiff(self.answer_ids, self.wrong_ids)
        return dp.Logit(self.answer_ids)
