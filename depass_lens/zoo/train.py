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
from depass_lens.zoo.ablation import ablation_effects, circuit_heads, logit_diff, top_components
from depass_lens.zoo.mechanisms import MECHANISMS, card_section, paths_path, read_paths
from depass_lens.zoo.registry import SPECS, ZooSpec
from depass_lens.zoo.roles import ROLES, head_role_scores, heads_with_role
from depass_lens.zoo.store import build_model, load_model, read_meta, save
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
def corrupted_metric(model: TLModel, task: Task) -> dict[str, float]:
    """The ablation metric on the held-out prompts and on their corrupted versions."""
    batch = task.batch(model, 200, split="test", seed=11)  # the prompts the ablations use
    assert batch.wrong is not None and batch.corrupted is not None
    corrupted = model(batch.corrupted)
    return {
        "clean": float(logit_diff(model(batch.tokens), batch.answers, batch.wrong)),
        "corrupted": float(logit_diff(corrupted, batch.answers, batch.wrong)),
        "corrupted_top1_answer": float(
            (corrupted[:, -1].argmax(-1) == batch.answers).float().mean()
        ),
    }


def card_text(
    spec: ZooSpec,
    meta: dict[str, Any],
    effects: dict[str, Any],
    corruption: dict[str, float] | None = None,
    paths: dict[str, Any] | None = None,
) -> str:
    """The model card: config, training command, results, corrupted distribution and circuit."""
    acc = meta["accuracy"]
    lines = [
        f"# Zoo model `{spec.name}`",
        "",
        spec.description + ".",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(meta["config"], indent=1),
        "```",
        "",
        "## Training",
        "",
        f"- command: `python -m depass_lens.zoo.train {spec.name} --seed {meta['seed']}`",
        f"- steps: {meta['steps']}, batch {spec.batch_size}, AdamW lr {spec.lr}, weight decay "
        f"{spec.weight_decay}, one-cycle schedule; seed {meta['seed']}",
        f"- wall time: {meta['train_seconds']:.0f} s on {meta['threads']} CPU thread(s); final "
        f"loss {meta['final_loss']:.3f}",
        f"- parameters: {meta['n_params']:,}; weights file {meta['weights_bytes'] / 1e6:.2f} MB",
        "",
        "## Held-out results",
        "",
        f"- top-1 accuracy (answer = argmax over all {meta['config']['d_vocab']} tokens): "
        f"{acc['top1']:.3f}",
    ]
    if "beats_wrong" in acc:
        lines.append(
            f"- answer logit > wrong-answer logit: {acc['beats_wrong']:.3f}; mean logit "
            f"difference {acc['logit_diff']:.2f}"
        )
    if "probe" in meta:
        lines.append(
            f"- language probe at `{meta['probe']['hook']}` (last position): held-out "
            f"accuracy {meta['probe']['accuracy']:.3f}"
        )
    task = TASKS[spec.task]
    if task.corruption:
        lines += ["", "## Corrupted distribution", "", task.corruption]
        if corruption is not None:
            lines += [
                "",
                f"On the {effects['n_examples']} held-out prompts of the ablations the logit "
                f"difference (answer - wrong answer) falls from {corruption['clean']:.2f} to "
                f"{corruption['corrupted']:.2f} on the corrupted prompts; the clean answer stays "
                f"top-1 on {corruption['corrupted_top1_answer']:.1%} of them.",
            ]
    lines += [
        "",
        "## Circuit (exhaustive ablation)",
        "",
        f"Metric: {effects['metric']}; clean value {effects['clean']:.3f} on "
        f"{effects['n_examples']} held-out prompts. Effect = metric(ablated) - metric(clean).",
        "",
    ]
    circuit = circuit_heads(effects, "mean")
    lines.append(
        f"Heads whose mean-ablation moves the metric by more than 10% of its clean value "
        f"({len(circuit)}): " + ", ".join(f"{n} ({v:+.2f})" for n, v in circuit)
    )
    lines.append("")
    if "head_roles" in meta:
        lines += [
            "Head roles (TransformerLens `detect_head` on repeated random sequences; score = share "
            "of attention where the role predicts it, heads above 0.3):",
            "",
        ]
        for role in ROLES:
            found = heads_with_role(meta["head_roles"], role)
            named = ", ".join(f"{n} ({v:.2f})" for n, v in found) or "none"
            lines.append(f"- {role.replace('_', ' ')}: {named}")
        lines.append("")
    for key in ("heads_mean", "heads_zero", "neurons_mean"):
        if key in effects:
            top = top_components(effects, key)
            lines.append(
                f"- top-5 by |{key.replace('_', ' ')} ablation effect|: "
                + ", ".join(f"{n} ({v:+.2f})" for n, v in top)
            )
    mechanism = card_section(spec.name, paths)
    if mechanism:
        lines += ["", *mechanism]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_card(spec: ZooSpec, model: TLModel | None = None) -> str:
    """Rewrite ``spec``'s card from its shipped files (weights, metadata, ablations, paths)."""
    model = model if model is not None else load_model(spec)
    meta = read_meta(spec)
    effects = json.loads(spec.ablation_path.read_text())
    corruption = corrupted_metric(model, TASKS[spec.task]())
    text = card_text(spec, meta, effects, corruption, read_paths(spec.root, spec.name))
    spec.card_path.parent.mkdir(parents=True, exist_ok=True)
    spec.card_path.write_text(text)
    return text


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
        from depass_lens.zoo.paths import measure

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
