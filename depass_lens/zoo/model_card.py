"""A zoo model's card: written from its shipped files (weights, metadata, ablations, paths)."""

from __future__ import annotations

import json
from typing import Any

from depass_lens.adapters.base import TLModel
from depass_lens.zoo.ablation import circuit_heads, logit_diff, top_components
from depass_lens.zoo.mechanisms import card_section, read_paths
from depass_lens.zoo.registry import ZooSpec
from depass_lens.zoo.roles import ROLES, heads_with_role
from depass_lens.zoo.store import load_model, read_meta
from depass_lens.zoo.tasks import TASKS, Task


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
