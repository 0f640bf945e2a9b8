"""What every zoo task provides: a vocabulary, training text, and labelled evaluation batches."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from depass_lens.adapters.base import TLModel
from depass_lens.checks import as_int, check_choice, check_count

#: The two disjoint example sets: held-out pairs/chains are drawn only for ``"test"``.
SPLITS = ("train", "test")


@dataclass
class Example:
    """One prompt (words, without BOS), its answer, a wrong answer and a corrupted prompt."""

    words: list[str]
    answer: str
    wrong: str | None = None
    corrupted: list[str] | None = None
    label: str | None = None  # e.g. the language, for the bilingual task


@dataclass
class ZooBatch:
    """A batch of same-length prompts as token ids (BOS first), with answers and counterfactuals.

    All prompts of a zoo task have the same length, so no padding is needed and the answer is
    always read at the last position.
    """

    prompts: list[str]
    tokens: Int[Tensor, "batch pos"]
    answers: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"] | None
    corrupted: Int[Tensor, "batch pos"] | None
    labels: list[str | None]


class Task(ABC):
    """A seeded, deterministic synthetic task."""

    name: str = "task"
    #: What the corrupted prompt (``Example.corrupted``) changes and why that breaks the mechanism
    #: (one paragraph of markdown, for the model card).
    corruption: str = ""

    @abstractmethod
    def words(self) -> list[str]:
        """Every word the task uses (the tokenizer's vocabulary, after the special tokens)."""

    @abstractmethod
    def example(self, rng: random.Random, split: str) -> Example:
        """One evaluation example from ``split`` (``"train"`` or ``"test"``)."""

    def sentence(self, rng: random.Random) -> list[str]:
        """One training sentence (next-token loss over every position): prompt + answer."""
        ex = self.example(rng, "train")
        return [*ex.words, ex.answer]

    def sentence_with_mask(self, rng: random.Random) -> tuple[list[str], list[float]]:
        """A training sentence and, per predicted word, whether it counts in the loss."""
        words = self.sentence(rng)
        return words, [1.0] * len(words)

    def examples(self, n: int, split: str = "test", seed: int = 0) -> list[Example]:
        """``n`` examples from ``split`` (``"train"`` or ``"test"``), the same for the same seed."""
        n = check_count(n, "n")
        check_choice(split, SPLITS, "split")
        seed = as_int(seed, "seed")
        rng = random.Random(f"{self.name}-{split}-{seed}")
        return [self.example(rng, split) for _ in range(n)]

    def batch(self, model: TLModel, n: int = 64, split: str = "test", seed: int = 0) -> ZooBatch:
        """``n`` examples as token ids for ``model`` (which carries this task's tokenizer)."""
        examples = self.examples(n, split, seed)

        def ids(words: list[str]) -> Tensor:
            # never cut at n_ctx (TransformerLens's default): a long example is refused later
            return model.to_tokens(" ".join(words), prepend_bos=True, truncate=False)[0]

        def single(word: str) -> int:
            return int(model.to_single_token(word))

        has_wrong = all(e.wrong is not None for e in examples)
        has_corrupt = all(e.corrupted is not None for e in examples)
        return ZooBatch(
            prompts=[" ".join(e.words) for e in examples],
            tokens=torch.stack([ids(e.words) for e in examples]),
            answers=torch.tensor([single(e.answer) for e in examples]),
            wrong=torch.tensor([single(e.wrong) for e in examples]) if has_wrong else None,  # type: ignore[arg-type]
            corrupted=torch.stack([ids(e.corrupted) for e in examples]) if has_corrupt else None,  # type: ignore[arg-type]
            labels=[e.label for e in examples],
        )
