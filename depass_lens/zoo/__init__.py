"""Small models trained by this project on synthetic tasks with known mechanisms, shipped offline.

>>> from depass_lens import zoo
>>> zoo.list()
['bilingual', 'induction', 'ioi', 'recall']
>>> model = zoo.load("ioi")                   # a HookedTransformer with its tokenizer
>>> batch = zoo.task("ioi").batch(model, 32)  # tokens, answers, wrong answers, corrupted prompts
>>> zoo.ground_truth("ioi")["heads_mean"]     # per-head mean-ablation effects
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from transformer_lens import HookedTransformer

from depass_lens.zoo.registry import SPECS, ZooSpec
from depass_lens.zoo.store import load_model, read_meta
from depass_lens.zoo.tasks import TASKS, Task, ZooBatch


def list() -> builtins.list[str]:  # noqa: A001 - the zoo's public verb, as in torch.hub.list
    """Names of the zoo models."""
    return sorted(SPECS)


def spec(name: str) -> ZooSpec:
    if name not in SPECS:
        raise KeyError(f"no zoo model {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def load(name: str, device: str = "cpu") -> HookedTransformer:
    """The trained model ``name`` with its tokenizer, offline."""
    return load_model(spec(name), device)


def task(name: str) -> Task:
    """The task generator the model was trained on (``.batch(model, n)`` for evaluation)."""
    return TASKS[spec(name).task]()


def ground_truth(name: str) -> dict[str, Any]:
    """Exhaustive ablation effects: ``heads_zero``/``heads_mean`` [layer][head], ``neurons_*``."""
    return json.loads(spec(name).ablation_path.read_text())


def card(name: str) -> str:
    """The model card (markdown)."""
    return spec(name).card_path.read_text()


def info(name: str) -> dict[str, Any]:
    """Training metadata: config, accuracy, timings, and the language probe where there is one."""
    return read_meta(spec(name))


def example(name: str) -> tuple[str, str | None, str | None]:
    """One held-out prompt with its answer and wrong answer, for demos."""
    ex = task(name).examples(1, "test", seed=2024)[0]
    return " ".join(ex.words), ex.answer, ex.wrong


__all__ = ["ZooBatch", "card", "example", "ground_truth", "info", "list", "load", "spec", "task"]
