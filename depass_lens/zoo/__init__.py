"""Small models trained by this project on synthetic tasks with known mechanisms, shipped offline.

>>> from depass_lens import zoo
>>> zoo.list()
['bilingual', 'binding', 'induction', 'ioi', 'recall']
>>> model = zoo.load("ioi")                   # HookedTransformer (TL 3) / TransformerBridge (TL 4)
>>> batch = zoo.task("ioi").batch(model, 32)  # tokens, answers, wrong answers, corrupted prompts
>>> zoo.ground_truth("ioi")["heads_mean"]     # per-head mean-ablation effects
>>> zoo.mechanism("binding").stages           # stages and edges, established by path patching
>>> sae = zoo.load_sae("ioi")                 # an SAE on the ioi model's residual stream
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from depass_lens.adapters.base import TLModel
from depass_lens.zoo.mechanisms import MECHANISMS, Mechanism, read_paths
from depass_lens.zoo.registry import SPECS, ZooSpec
from depass_lens.zoo.saes import load_sae, sae_card, sae_stats
from depass_lens.zoo.store import load_model, read_meta
from depass_lens.zoo.tasks import TASKS, Task, ZooBatch


def list() -> builtins.list[str]:  # noqa: A001 - the zoo's public verb, as in torch.hub.list
    """Names of the zoo models."""
    return sorted(SPECS)


def spec(name: str) -> ZooSpec:
    if name not in SPECS:
        raise KeyError(f"no zoo model {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def load(name: str, device: str = "cpu") -> TLModel:
    """The trained model ``name`` with its tokenizer, offline."""
    return load_model(spec(name), device)


def task(name: str) -> Task:
    """The task generator the model was trained on (``.batch(model, n)`` for evaluation)."""
    return TASKS[spec(name).task]()


def ground_truth(name: str) -> dict[str, Any]:
    """Exhaustive ablation effects: ``heads_zero``/``heads_mean`` [layer][head], ``neurons_*``."""
    return json.loads(spec(name).ablation_path.read_text())


def mechanism(name: str) -> Mechanism:
    """The model's mechanism: stages (their heads) and edges, each established by path patching."""
    if name not in MECHANISMS:
        raise KeyError(f"no mechanism documented for {name!r}; documented: {sorted(MECHANISMS)}")
    return MECHANISMS[name]


def path_effects(name: str) -> dict[str, Any]:
    """The measured path-patching effect of every edge of ``mechanism(name)``."""
    measured = read_paths(spec(name).root, name)
    if measured is None:
        raise FileNotFoundError(f"no path-patching results for {name!r}")
    return measured


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


__all__ = [
    "Mechanism",
    "ZooBatch",
    "card",
    "example",
    "ground_truth",
    "info",
    "list",
    "load",
    "load_sae",
    "sae_card",
    "sae_stats",
    "mechanism",
    "path_effects",
    "spec",
    "task",
]
