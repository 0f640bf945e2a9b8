"""Train a zoo model, measure it, find its circuit by ablation, and ship weights + card.

    python -m depass_lens.zoo.train ioi                  # full recipe, writes depass_lens/zoo/
    python -m depass_lens.zoo.train ioi --steps 20 --out /tmp/zoo   # a quick check
    python -m depass_lens.zoo.train ioi --card-only      # rewrite the card from the shipped files

Training is next-token prediction over whole sentences (for ``ioi``: IOI sentences, so the name
mechanism is learnt as part of language modelling rather than as a single answer classifier).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from depass_lens.adapters.base import TLModel
from depass_lens.zoo.ablation import ablation_effects
from depass_lens.zoo.mechanisms import MECHANISMS, paths_path
from depass_lens.zoo.model_card import write_card
from depass_lens.zoo.paths import measure
from depass_lens.zoo.registry import SPECS, ZooSpec
from depass_lens.zoo.roles import head_role_scores
from depass_lens.zoo.store import build_model, save
from depass_lens.zoo.tasks import TASKS, Task


@dataclass
class TrainResult:
    model: TLModel
    losses: list[float]
    seconds: float


def sentences_to_tokens(model: TLModel, sentences: list[list[str]]) -> torch.Tensor:
    return torch.stack([model.to_tokens(" ".join(s), prepend_bos=True)[0] for s in sentences])


def train(
    spec: ZooSpec, task: Task, steps: int, seed: int = 0, progress: bool = True
) -> TrainResult:
    """Next-token training on ``task.sentence`` batches with AdamW and a cosine schedule."""
    torch.manual_seed(seed)
    rng = random.Random(f"train-{spec.name}-{seed}")
    model = build_model(spec, task.words(), seed=seed)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=spec.lr, total_steps=max(steps, 2), pct_start=0.1
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"training {spec.name}", disable=not progress, mininterval=2.0)
    for _ in bar:
        drawn = [task.sentence_with_mask(rng) for _ in range(spec.batch_size)]
        tokens = sentences_to_tokens(model, [words for words, _ in drawn])
        logits = model(tokens)[:, :-1]
        targets = tokens[:, 1:]
        mask = torch.tensor([m for _, m in drawn], dtype=logits.dtype)  # batch, predicted words
        loss_per = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (loss_per * mask).sum() / mask.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return TrainResult(model, losses, time.perf_counter() - start)


@torch.no_grad()
def accuracy(model: TLModel, task: Task, n: int = 500, split: str = "test") -> dict[str, float]:
    """Top-1 accuracy over the whole vocabulary, and how often answer beats the wrong answer."""
    batch = task.batch(model, n, split=split, seed=7)
    last = model(batch.tokens)[:, -1]
    rows = torch.arange(n)
    out = {"top1": float((last.argmax(-1) == batch.answers).float().mean())}
    if batch.wrong is not None:
        out["beats_wrong"] = float(
            (last[rows, batch.answers] > last[rows, batch.wrong]).float().mean()
        )
        out["logit_diff"] = float((last[rows, batch.answers] - last[rows, batch.wrong]).mean())
    return out


@torch.no_grad()
def language_probe(model: TLModel, task: Task, hook: str, n: int = 400) -> dict[str, Any]:
    """Difference-of-means probe for the language label at ``hook`` (last position)."""
    fit = task.batch(model, n, split="train", seed=3)
    test = task.batch(model, n, split="test", seed=4)

    def states(batch) -> tuple[torch.Tensor, torch.Tensor]:
        _, cache = model.run_with_cache(batch.tokens, names_filter=hook)
        is_b = torch.tensor([label == "B" for label in batch.labels])
        return cache[hook][:, -1], is_b

    x, is_b = states(fit)
    direction = x[is_b].mean(0) - x[~is_b].mean(0)
    direction = direction / direction.norm()
    threshold = float(((x[is_b] @ direction).mean() + (x[~is_b] @ direction).mean()) / 2)
    x_test, b_test = states(test)
    acc = float((((x_test @ direction) > threshold) == b_test).float().mean())
    return {
        "hook": hook,
        "pos": -1,
        "direction": direction.tolist(),
        "threshold": threshold,
        "accuracy": acc,
        "label": "language B (positive) vs A",
    }


@torch.no_grad()
def run(name: str, steps: int | None, seed: int, out: Path | None, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    spec = SPECS[name] if out is None else replace(SPECS[name], root=Path(out))
    task = TASKS[spec.task]()
    n_steps = steps if steps is not None else spec.steps
    result = train(spec, task, n_steps, seed)
    model = result.model
    meta: dict[str, Any] = {
        "name": spec.name,
        "task": spec.task,
        "seed": seed,
        "steps": n_steps,
        "config": {**spec.config, "d_vocab": model.cfg.d_vocab},
        "train_seconds": result.seconds,
        "threads": threads,
        "final_loss": result.losses[-1],
        "first_loss": result.losses[0],
        "n_params": sum(p.numel() for p in model.parameters()),
        "accuracy": accuracy(model, task),
    }
    if "probe_hook" in spec.extra:
        meta["probe"] = language_probe(model, task, spec.extra["probe_hook"])
    if spec.extra.get("head_roles"):
        meta["head_roles"] = head_role_scores(model, task.words(), seed=seed)
    test = task.batch(model, 200, split="test", seed=11)
    reference = task.batch(model, 200, split="train", seed=12)
    assert test.wrong is not None
    effects = ablation_effects(model, test.tokens, test.answers, test.wrong, reference.tokens)
    save(model, spec, task.words(), meta)
    meta["weights_bytes"] = spec.weights_path.stat().st_size
    save(model, spec, task.words(), meta)
    spec.ablation_path.write_text(json.dumps(effects))
    if spec.name in MECHANISMS:  # re-measure the documented edges on the new weights
        paths_path(spec.root, spec.name).write_text(json.dumps(measure(model, spec), indent=1))
    write_card(spec, model)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: the package's zoo folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--card-only", action="store_true", help="rewrite the card from the shipped files only"
    )
    args = parser.parse_args()
    if args.card_only:
        spec = SPECS[args.name] if args.out is None else replace(SPECS[args.name], root=args.out)
        write_card(spec)
        print(spec.card_path)
        return
    meta = run(args.name, args.steps, args.seed, args.out, args.threads)
    print(json.dumps({k: v for k, v in meta.items() if k not in ("config", "probe")}, indent=1))


if __name__ == "__main__":
    main()
