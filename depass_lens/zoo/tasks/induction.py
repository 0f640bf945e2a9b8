"""Induction: a random sequence repeated once; the second copy is predictable from the first.

A prompt is ``[BOS] n_1 .. n_k r_1 .. r_L r_1 .. r_{L-1}`` with answer ``r_L``: ``k`` noise tokens,
then a random sequence of random length ``L`` (5 to 10) and its repeat, always 19 tokens after BOS.
Because ``L`` varies, the distance back to the earlier copy varies too, so a fixed positional
offset cannot solve the task: the model has to find the previous occurrence of the current token
(previous-token head + induction head). The corrupted prompt replaces the first copy with fresh
tokens, so copying no longer works.
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task

VOCAB = [f"t{i}" for i in range(60)]
MIN_LENGTH, MAX_LENGTH = 5, 10
TOTAL = 2 * MAX_LENGTH  # tokens after BOS in a training sentence


class InductionTask(Task):
    name = "induction"

    def words(self) -> list[str]:
        return list(VOCAB)

    def _draw(self, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
        length = rng.randint(MIN_LENGTH, MAX_LENGTH)
        seq = rng.sample(VOCAB, length)
        others = [t for t in VOCAB if t not in seq]
        noise = rng.sample(others, TOTAL - 2 * length)
        fresh = rng.sample(others, length)
        return noise, seq, fresh

    def example(self, rng: random.Random, split: str) -> Example:
        noise, seq, fresh = self._draw(rng)
        wrong = rng.choice([t for t in VOCAB if t not in seq])
        return Example(
            words=noise + seq + seq[:-1],
            answer=seq[-1],
            wrong=wrong,
            corrupted=noise + fresh + seq[:-1],
        )

    def sentence_with_mask(self, rng: random.Random) -> tuple[list[str], list[float]]:
        """Noise and first copy are unpredictable: only the second copy counts in the loss."""
        noise, seq, _ = self._draw(rng)
        words = noise + seq + seq
        mask = [0.0] * (len(noise) + len(seq)) + [1.0] * len(seq)
        return words, mask
