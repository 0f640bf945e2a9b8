"""The recall facts in two synthetic languages with disjoint vocabularies.

Language B renames every word of language A one-to-one (``Paris`` -> ``Paris_b``), so the model
must keep *what* is being said (meaning) apart from *which language* it is said in. A linear probe
for the language reads the residual stream almost perfectly; the shipped probe direction lets
``Subspace``/``Direction`` attribution split the stream into a language part and the rest.
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task
from depass_lens.zoo.tasks.recall import RecallTask


def translate(word: str) -> str:
    return f"{word}_b"


class BilingualTask(Task):
    name = "bilingual"
    corruption = (
        "As for `recall`, in the prompt's own language: the subject is swapped for another "
        "subject with the same relation (language B words renamed the same way), so the fact "
        "looked up is the other subject's; the language does not change. The wrong answer is a "
        "random other object of the relation."
    )

    def __init__(self) -> None:
        self.recall = RecallTask()

    def words(self) -> list[str]:
        base = self.recall.words()
        return base + [translate(w) for w in base]

    def example(self, rng: random.Random, split: str) -> Example:
        ex = self.recall.example(rng, split)
        if rng.random() < 0.5:
            return Example(ex.words, ex.answer, ex.wrong, ex.corrupted, label="A")
        assert ex.corrupted is not None and ex.wrong is not None
        return Example(
            [translate(w) for w in ex.words],
            translate(ex.answer),
            translate(ex.wrong),
            [translate(w) for w in ex.corrupted],
            label="B",
        )
