"""The shipped zoo models: offline loading, tokenizers, held-out accuracy, reproducible training."""

from __future__ import annotations

import pytest
import torch

from depass_lens import zoo
from depass_lens.zoo.registry import SPECS
from depass_lens.zoo.tasks import TASKS
from depass_lens.zoo.train import accuracy, train

#: Held-out top-1 accuracy each shipped model must keep (recall/bilingual: memorised facts).
BARS = {"ioi": 0.95, "induction": 0.9, "recall": 0.95, "bilingual": 0.95}


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
