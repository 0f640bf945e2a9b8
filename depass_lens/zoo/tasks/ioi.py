"""Indirect object identification: "When Mary and John went to the store , John gave a drink to"
-> "Mary".

Eight templates of equal length (14 words), 50 names, both name orders (ABBA: the indirect object
is mentioned first; BABA: second). Held-out examples use (indirect object, subject) name pairs that
never occur together in training. The corrupted prompt replaces the second mention of the subject
with a third name (the "ABC" distribution), which removes the duplicated-name signal.
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task

NAMES = (
    "Mary John Alice Bob Sarah James Emma David Laura Michael Anna Daniel Julia Thomas Lisa "
    "Peter Kate Robert Clara Paul Nina Simon Rose Martin Eva George Lucy Henry Sophie Jack Maria "
    "Adam Ella Oscar Grace Victor Iris Hugo Chloe Felix Tina Mark Zoe Leon Amy Ryan Ruth Carl Vera "
    "Ivan"
).split()
PLACES = "store park school office garden market library station beach museum".split()
OBJECTS = "drink book ball letter key ring cake pen bag gift".split()
TEMPLATES = (
    "When A and B went to the P , S gave a O to",
    "After A and B went to the P , S handed a O to",
    "While A and B were at the P , S passed a O to",
    "Then A and B arrived at the P . S brought a O to",
    "Once A and B walked into the P , S threw a O to",
    "Later A and B sat in the P , and S gave O to",
    "When A and B visited the old P , S sold a O to",
    "Since A and B stayed at the P , S lent a O to",
)


def _held_out(io: str, s: str) -> bool:
    """One name pair in five (unordered, fixed by the names) is reserved for testing."""
    a, b = sorted((NAMES.index(io), NAMES.index(s)))
    return (a * 31 + b * 17) % 5 == 0


class IOITask(Task):
    name = "ioi"
    corruption = (
        "The ABC distribution: the second mention of the subject is replaced by a third name that "
        'occurs nowhere else in the prompt ("When Mary and John went to the store , Kate gave a '
        'drink to"), same template, place and object. Both earlier names now occur once each, so '
        "nothing marks either of them as the subject any more: the duplicated-name signal that "
        "tells the model which of the two names not to say is gone, and the answer is a guess "
        "between the indirect object and the subject (the wrong answer)."
    )

    def words(self) -> list[str]:
        template_words = {
            w for t in TEMPLATES for w in t.split() if w not in {"A", "B", "S", "P", "O"}
        }
        return sorted(template_words) + list(NAMES) + list(PLACES) + list(OBJECTS) + ["."]

    def example(self, rng: random.Random, split: str) -> Example:
        while True:
            io, s, c = rng.sample(NAMES, 3)
            if _held_out(io, s) == (split == "test"):
                break
        template = rng.choice(TEMPLATES)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA or BABA
        fill = {"A": first, "B": second, "P": rng.choice(PLACES), "O": rng.choice(OBJECTS)}
        words = [fill.get(w, w) for w in template.split()]
        corrupted = [fill.get(w, w) for w in template.split()]
        words = [s if w == "S" else w for w in words]
        corrupted = [c if w == "S" else w for w in corrupted]
        return Example(
            words, io, wrong=s, corrupted=corrupted, label="ABBA" if first == io else "BABA"
        )

    def sentence(self, rng: random.Random) -> list[str]:
        ex = self.example(rng, "train")
        return [*ex.words, ex.answer, "."]
