"""Two-hop variable binding: "5 -> e ; 7 -> a ; a -> b ; ... ? b" -> "7".

A prompt is a six-statement program of assignments ``Y -> X ;`` ("Y is assigned to X", R's right
assignment), then ``? Q``. Four statements bind a variable to a value (``7 -> a``), two bind a
variable to another variable (``a -> b``: an alias); each alias points to its own bound variable,
so the program holds two chains ``7 -> a -> b`` and ``3 -> c -> d`` and two unaliased bindings.
The query ``Q`` is one of the two aliases and the answer is the value its chain starts from: the
value assigned to the variable assigned to ``Q``. Every prompt is 26 words (27 tokens with BOS),
answer at the last position.

Shortcuts closed by construction:

- every variable and every value occurs in at most one binding, so the answer is unambiguous, and
  four values compete, so "a value of the prompt" does not find it;
- there are two chains, so "the value of the variable that has an alias" is right only half the
  time: the query decides which chain;
- the statements are shuffled, subject only to program order (a variable is bound before an alias
  uses it, and one unaliased binding comes before the queried alias, so that the corrupted
  prompts are programs too), so no position identifies the answer or the chain.

Training sentences add three more queries after the first (``? b 7 ? e 5 ...``, four different
variables, aliases and bound variables alike) and count the answers only: one-hop queries give
the lookups a direct training signal. Held-out prompts query a chain whose (alias, variable) pair
is reserved for testing: training sentences never contain that pair as a chain.

The corrupted prompt redirects the queried alias to an unaliased variable bound before it
(``a -> b`` becomes ``e -> b``), so the second hop lands on another binding and the answer becomes
that variable's value, which is the example's wrong answer. Three further counterfactuals of
the same clean prompts (``BindingTask(corruption=...)``, ``COUNTERFACTUALS``) change what the
other stages read, for path patching: ``realias`` swaps the two aliases' names (``a -> b ; c ->
d`` becomes ``a -> d ; c -> b``: the query now names the other chain), ``rename`` swaps the
queried chain's variable with that unaliased one where they are bound (``7 -> a ; 5 -> e``
becomes ``7 -> e ; 5 -> a``) and ``revalue`` swaps their values (``5 -> a ; 7 -> e``).

The program order matters for learning: with the statements in any order (an alias may come
before the binding it uses) the same recipe stayed at chance on two-hop queries (held-out top-1
0.26-0.29 after 3000 steps, two runs), while in program order the shipped model's training loss
is below 0.02 by step 1000. In program order the model resolves each alias where it is written
(``zoo.mechanism("binding")``).
"""

from __future__ import annotations

import random

from depass_lens.zoo.tasks.base import Example, Task

VARIABLES = list("abcdefghijklmnopqrstuvwx")  # 24 variable names
VALUES = [str(i) for i in range(10)]
N_CHAINS, N_PLAIN = 2, 2  # alias chains and unaliased bindings per prompt
N_QUERIES = 4  # queries per training sentence
LENGTH = 4 * (2 * N_CHAINS + N_PLAIN) + 2  # words after BOS: six statements, then "? Q"

#: The counterfactuals besides the corrupted prompt (``redirect``), for path patching.
COUNTERFACTUALS = {
    "realias": (
        "the two aliases swap names (`a -> b ; c -> d` becomes `a -> d ; c -> b`), so the "
        "query's assignment is now the other chain's alias statement and the answer the other "
        "chain's value."
    ),
    "rename": (
        "the queried chain's variable and an unaliased variable swap names where they are "
        "bound (`7 -> a ; 5 -> e` becomes `7 -> e ; 5 -> a`), so the second hop lands on the "
        "other binding and the answer is the wrong answer."
    ),
    "revalue": (
        "the queried chain's variable and an unaliased variable swap values (`7 -> a ; 5 -> e` "
        "becomes `5 -> a ; 7 -> e`): every lookup lands where it did, but reads the other value, "
        "which is the wrong answer."
    ),
}


def _held_out(alias: str, target: str) -> bool:
    """One ordered (alias, variable) pair in five is reserved for testing."""
    return (VARIABLES.index(alias) * 7 + VARIABLES.index(target) * 3) % 5 == 0


def _render(statements: list[tuple[str, str]], order: list[int]) -> list[str]:
    """``(variable, what is assigned to it)`` pairs as ``Y -> X ;`` in the given order."""
    return [word for i in order for word in (statements[i][1], "->", statements[i][0], ";")]


class BindingTask(Task):
    name = "binding"
    corruption = (
        "The queried alias is redirected to one of the two unaliased variables (`a -> b` "
        "becomes `e -> b`); every other statement, the order and the query are unchanged. The "
        "first hop now fetches `e`, so the second hop lands on `e`'s binding and the answer "
        "becomes `e`'s value, which is the example's wrong answer: a model that follows both "
        "hops flips its answer, while one that only looked for aliased variables, values or "
        "positions would not notice."
    )
    counterfactuals = COUNTERFACTUALS

    def __init__(self, corruption: str = "redirect") -> None:
        if corruption not in ("redirect", *COUNTERFACTUALS):
            raise ValueError(f"unknown corruption {corruption!r}")
        self.kind = corruption

    def words(self) -> list[str]:
        return [*VARIABLES, *VALUES, "->", ";", "?"]

    def _draw(
        self, rng: random.Random, split: str
    ) -> tuple[list[str], list[str], list[str], list[str], list[int]]:
        """Aliases, the variables they point to, unaliased variables, values (for the bound
        variables, in that order) and the statement order."""
        while True:
            names = rng.sample(VARIABLES, 2 * N_CHAINS + N_PLAIN)
            aliases, targets = names[:N_CHAINS], names[N_CHAINS : 2 * N_CHAINS]
            held = [_held_out(a, t) for a, t in zip(aliases, targets)]
            # the queried chain (index 0) is held out exactly for the test split; the other
            # chain never is, so training sentences never contain a test pair
            if held[0] == (split == "test") and not any(held[1:]):
                break
        values = rng.sample(VALUES, N_CHAINS + N_PLAIN)
        order = list(range(2 * N_CHAINS + N_PLAIN))  # statements: aliases, then bindings
        while True:  # program order: a variable is bound before an alias uses it, and at least
            rng.shuffle(order)  # one unaliased binding comes before the queried alias
            at = {statement: i for i, statement in enumerate(order)}
            if all(at[N_CHAINS + c] < at[c] for c in range(N_CHAINS)) and any(
                at[2 * N_CHAINS + p] < at[0] for p in range(N_PLAIN)
            ):
                return aliases, targets, names[2 * N_CHAINS :], values, order

    def example(self, rng: random.Random, split: str) -> Example:
        aliases, targets, plain, values, order = self._draw(rng, split)
        bound = [*targets, *plain]
        before = [v for v in plain if order.index(N_CHAINS + bound.index(v)) < order.index(0)]
        other = rng.choice(before)  # where the counterfactuals send the query (bound in time)
        statements = [*zip(aliases, targets), *zip(bound, values)]
        query, answer = aliases[0], values[0]
        wrong = values[bound.index(other)]
        changed = list(statements)
        if self.kind == "redirect":
            changed[0] = (query, other)
        elif self.kind == "realias":
            changed[0], changed[1] = (aliases[1], targets[0]), (query, targets[1])
        else:  # rename / revalue: swap the names / the values of targets[0] and ``other``
            first, second = N_CHAINS, N_CHAINS + bound.index(other)
            if self.kind == "rename":
                changed[first], changed[second] = (other, values[0]), (targets[0], wrong)
            else:
                changed[first], changed[second] = (targets[0], wrong), (other, values[0])
        return Example(
            words=[*_render(statements, order), "?", query],
            answer=answer,
            wrong=wrong,
            corrupted=[*_render(changed, order), "?", query],
        )

    def sentence_with_mask(self, rng: random.Random) -> tuple[list[str], list[float]]:
        """Six statements, then four different queries with their answers (``? b 7 ? e 5 ...``),
        two-hop (an alias) and one-hop (a bound variable) ones; the loss counts the answers."""
        aliases, targets, plain, values, order = self._draw(rng, "train")
        bound = [*targets, *plain]
        statements = [*zip(aliases, targets), *zip(bound, values)]
        words = _render(statements, order)
        mask = [0.0] * len(words)
        value = dict(zip(bound, values)) | {a: values[i] for i, a in enumerate(aliases)}
        for query in rng.sample(sorted(value), N_QUERIES):
            words += ["?", query, value[query]]
            mask += [0.0, 0.0, 1.0]
        return words, mask
