"""Induction: a random sequence seen once and then again; its second copy is predictable.

A prompt is ``[BOS] a_1 .. a_p  r_1 .. r_L  b_1 .. b_q  r_1 .. r_m`` with answer ``r_{m+1}``: a
random sequence ``r`` of random length between noise tokens ``a`` and ``b``, then the start of its
repeat, always 19 tokens after BOS. The model has to find the earlier occurrence of the current
token ``r_m`` and copy the token that followed it: a previous-token head in layer 0 and an
induction head in layer 1.

Two shortcuts are closed by construction, because a first version of this task left them open and
the trained model used them instead of induction heads:

- tokens are drawn with replacement from a small vocabulary, so "the token of the first copy not
  yet repeated" does not identify the answer (noise and sequence share tokens);
- the first copy sits at a random place between two noise runs, so attending to a fixed region of
  positions does not find it either.

Evaluation prompts are unambiguous: the query token ``r_m`` occurs exactly once before it. The
corrupted prompt replaces the first copy with fresh tokens that do not contain the query, so
copying no longer works.
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task

VOCAB = [f"t{i}" for i in range(40)]
MIN_LENGTH, MAX_LENGTH = 4, 8  # length of the repeated sequence
LENGTH = 19  # words after BOS in a prompt; training sentences add the answer (20)


def _draw(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


class InductionTask(Task):
    name = "induction"
    corruption = (
        "The first copy of the repeated sequence is replaced by fresh random tokens that do not "
        "contain the query token; the noise around it and the start of the repeat are kept, so "
        "the prompt has the same length and layout. The query token now has no earlier "
        'occurrence, so the previous-token head marks no position as "comes after the query" '
        "and the induction heads find nothing to copy."
    )

    def words(self) -> list[str]:
        return list(VOCAB)

    def _layout(self, rng: random.Random) -> tuple[list[str], list[str], list[str], int]:
        """Noise before, the sequence, noise between, and how much of the repeat is shown."""
        length = rng.randint(MIN_LENGTH, MAX_LENGTH)
        shown = rng.randint(1, length - 1)  # r_1 .. r_shown, answer r_{shown+1}
        noise = LENGTH - length - shown
        before = rng.randint(0, noise - 1)  # at least one noise token between the copies
        return _draw(rng, before), _draw(rng, length), _draw(rng, noise - before), shown

    def example(self, rng: random.Random, split: str) -> Example:
        while True:  # rejection sampling: the query token must point to one earlier position
            before, seq, between, shown = self._layout(rng)
            words = before + seq + between + seq[:shown]
            query, answer = seq[shown - 1], seq[shown]
            if words.count(query) == 2:
                break
        while True:
            fresh = _draw(rng, len(seq))
            if query not in fresh:
                break
        wrong = rng.choice([t for t in VOCAB if t != answer and t not in words])
        return Example(
            words=words,
            answer=answer,
            wrong=wrong,
            corrupted=before + fresh + between + seq[:shown],
        )

    def sentence_with_mask(self, rng: random.Random) -> tuple[list[str], list[float]]:
        """A prompt plus its answer; the loss counts the repeat from its second token on (its
        first token follows random noise and cannot be predicted)."""
        before, seq, between, shown = self._layout(rng)
        start = len(before) + len(seq) + len(between)  # index of the repeat's first word
        words = before + seq + between + seq[: shown + 1]
        mask = [1.0 if i > start else 0.0 for i in range(len(words))]
        return words, mask
