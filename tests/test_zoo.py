"""The shipped zoo models: offline loading, tokenizers, held-out accuracy, reproducible training."""

from __future__ import annotations

import random

import pytest
import torch

from depass_lens import zoo
from depass_lens.zoo.registry import SPECS
from depass_lens.zoo.tasks import TASKS
from depass_lens.zoo.train import accuracy, train

#: Held-out top-1 accuracy each shipped model must keep (recall/bilingual: memorised facts).
BARS = {"ioi": 0.95, "induction": 0.9, "recall": 0.95, "bilingual": 0.95, "binding": 0.95}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_shipped_model_loads_offline_and_is_accurate(name):
    model = zoo.load(name)
    spec = zoo.spec(name)
    assert spec.weights_path.stat().st_size <= 10 * 2**20
    acc = accuracy(model, zoo.task(name), n=200)
    assert acc["top1"] >= BARS[name], acc
    assert zoo.info(name)["accuracy"]["top1"] >= BARS[name]
    truth = zoo.ground_truth(name)
    assert len(truth["heads_mean"]) == model.cfg.n_layers
    assert "Circuit" in zoo.card(name)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tokenizer_round_trips(name):
    model = zoo.load(name)
    example = zoo.task(name).examples(1, seed=3)[0]
    prompt = " ".join(example.words)
    assert model.to_str_tokens(prompt) == ["<bos>", *example.words]
    assert model.to_single_token(example.answer) == model.to_single_token(" " + example.answer)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_training_reduces_the_loss(name):
    torch.manual_seed(0)
    spec = SPECS[name]
    result = train(spec, TASKS[spec.task](), steps=25, seed=1, progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first, (first, last)


def test_task_batches_are_deterministic_and_aligned():
    model = zoo.load("ioi")
    task = zoo.task("ioi")
    a, b = task.batch(model, 8, seed=1), task.batch(model, 8, seed=1)
    assert torch.equal(a.tokens, b.tokens) and a.corrupted is not None
    assert a.tokens.shape == a.corrupted.shape
    held_out = {tuple(sorted((e.answer, e.wrong))) for e in task.examples(200, "test")}
    trained = {tuple(sorted((e.answer, e.wrong))) for e in task.examples(200, "train")}
    assert not held_out & trained  # test name pairs never occur together in training


def test_induction_model_has_previous_token_and_induction_heads():
    """The card's head roles hold for the shipped weights (TransformerLens's head detector)."""
    from depass_lens.zoo.roles import head_role_scores, heads_with_role

    model = zoo.load("induction")
    scores = head_role_scores(model, zoo.task("induction").words())
    shipped = zoo.info("induction")["head_roles"]
    for role, grid in scores.items():
        torch.testing.assert_close(
            torch.tensor(grid), torch.tensor(shipped[role]), atol=1e-4, rtol=0
        )
    previous = heads_with_role(scores, "previous_token_head", threshold=0.5)
    induction = heads_with_role(scores, "induction_head", threshold=0.4)
    assert [name for name, _ in previous] == ["L0H1"]
    assert {name for name, _ in induction} == {f"L1H{h}" for h in range(4)}
    # and the circuit by ablation runs through the previous-token head
    truth = zoo.ground_truth("induction")
    assert min(truth["heads_mean"][0]) == truth["heads_mean"][0][1]


def test_induction_prompts_are_unambiguous():
    """The query token occurs exactly once before the last position; corrupting removes it."""
    for example in zoo.task("induction").examples(100, seed=5):
        query = example.words[-1]
        assert example.words.count(query) == 2
        earlier = example.words.index(query)
        assert example.words[earlier + 1] == example.answer
        assert example.corrupted is not None and example.corrupted.count(query) == 1


def test_binding_prompts_are_unambiguous_programs():
    """Each variable is assigned once, before any alias uses it; the query is an alias whose chain
    ends in the answer; every counterfactual keeps the clean prompt, its length and the answer."""
    from depass_lens.zoo.tasks.binding import COUNTERFACTUALS, LENGTH, BindingTask, _held_out

    def resolve(words: list[str]) -> dict[str, str]:
        assigned: dict[str, str] = {}
        for i in range(0, len(words) - 2, 4):
            source, arrow, variable, end = words[i : i + 4]
            assert arrow == "->" and end == ";" and variable not in assigned
            assert not source.isalpha() or source in assigned  # program order
            assigned[variable] = assigned.get(source, source)
        return assigned

    task = zoo.task("binding")
    variants = {kind: BindingTask(kind) for kind in ["redirect", *COUNTERFACTUALS]}
    examples = {kind: t.examples(100, seed=5) for kind, t in variants.items()}
    for i, example in enumerate(task.examples(100, seed=5)):
        assert len(example.words) == LENGTH and example.words[-2] == "?"
        query = example.words[-1]
        values = resolve(example.words[:-2])
        assert values[query] == example.answer and example.wrong != example.answer
        assert _held_out(query, example.words[example.words.index(query) - 2])
        for kind, corrupted in examples.items():
            assert corrupted[i].words == example.words and corrupted[i].answer == example.answer
            assert corrupted[i].corrupted is not None
            assert len(corrupted[i].corrupted) == LENGTH
            flipped = resolve(corrupted[i].corrupted[:-2])[query]
            assert flipped != example.answer
            if kind != "realias":
                assert flipped == example.wrong
    for words, _ in (task.sentence_with_mask(random.Random(i)) for i in range(100)):
        resolve(words[: LENGTH - 2])
        for j in range(0, LENGTH - 2, 4):  # no held-out (alias, variable) pair in training
            if words[j].isalpha():
                assert not _held_out(words[j + 2], words[j])
