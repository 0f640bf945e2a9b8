"""Factual recall: subject-relation -> object facts memorised in the MLPs (a key-value store).

40 subjects x 3 relations = 120 facts, drawn once from a fixed seed: "Alice lives in" -> "Paris".
This is memorisation, so "held-out" evaluation re-asks the training facts; the corrupted prompt
asks the same relation about another subject.
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task

SUBJECTS = (
    "Alice Bruno Carmen Dmitri Elena Farid Greta Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya "
    "Quinn Rafael Sana Tomas Uma Viktor Wren Xenia Yusuf Zara Anton Bea Cyril Dana Emil Freya Gus "
    "Hana Igor Jana Kurt Lara Milo Nora"
).split()
RELATIONS = {
    ("lives", "in"): "Paris Tokyo Lima Cairo Oslo Delhi Rome Quito Seoul Accra Perth Riga".split(),
    (
        "works",
        "as",
    ): "baker pilot nurse judge chef miner poet tailor guard clerk farmer coach".split(),
    ("plays", "the"): "piano violin drums flute cello harp organ tuba banjo oboe lute horn".split(),
}


def fact_table(seed: int = 1234) -> dict[tuple[str, tuple[str, str]], str]:
    rng = random.Random(seed)
    return {(s, rel): rng.choice(objs) for s in SUBJECTS for rel, objs in RELATIONS.items()}


class RecallTask(Task):
    name = "recall"
    corruption = (
        'The subject is swapped for another subject, with the same relation ("Alice lives in" '
        '-> "Bruno lives in"). Only the subject identity changes, and that is the key the model '
        "moves to the last position and looks the fact up with, so the model recalls the other "
        "subject's fact. The wrong answer is a random other object of the relation, not the "
        "corrupted prompt's answer (the two subjects may even share the object)."
    )

    def __init__(self) -> None:
        self.facts = fact_table()

    def words(self) -> list[str]:
        relation_words = sorted({w for rel in RELATIONS for w in rel})
        objects = [o for objs in RELATIONS.values() for o in objs]
        return relation_words + list(SUBJECTS) + objects

    def example(self, rng: random.Random, split: str) -> Example:
        subject, other = rng.sample(SUBJECTS, 2)
        relation = rng.choice(list(RELATIONS))
        answer = self.facts[(subject, relation)]
        wrong = rng.choice([o for o in RELATIONS[relation] if o != answer])
        return Example(
            words=[subject, *relation], answer=answer, wrong=wrong, corrupted=[other, *relation]
        )
