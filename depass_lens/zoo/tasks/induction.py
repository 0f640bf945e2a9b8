"""Induction: a random sequence repeated once; the second copy is predictable from the first.

Prompts are ``[BOS] r_1 .. r_10 r_1 .. r_9`` with answer ``r_10``; the corrupted prompt replaces the
first copy with fresh random tokens, so copying can no longer work.
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task

VOCAB = [f"t{i}" for i in range(60)]
LENGTH = 10


class InductionTask(Task):
    name = "induction"

    def words(self) -> list[str]:
        return list(VOCAB)

    def example(self, rng: random.Random, split: str) -> Example:
        seq = rng.sample(VOCAB, LENGTH)
        fresh = rng.sample([t for t in VOCAB if t not in seq], LENGTH)
        wrong = rng.choice([t for t in VOCAB if t not in seq])
        return Example(
            words=seq + seq[:-1], answer=seq[-1], wrong=wrong, corrupted=fresh + seq[:-1]
        )

    def sentence(self, rng: random.Random) -> list[str]:
        seq = rng.sample(VOCAB, LENGTH)
        return seq + seq

    def loss_mask(self, length: int) -> list[float]:
        """Only the second copy is predictable; the first copy is noise."""
        return [0.0] * LENGTH + [1.0] * (length - LENGTH)
