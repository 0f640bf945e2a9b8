"""Ground truth by exhaustive ablation: every head's and every neuron's effect on the task metric.

Zero-ablation sets the component's activation (``attn.hook_z`` for a head, ``mlp.hook_post`` for a
neuron) to zero; mean-ablation sets it to its mean over a reference batch of the task distribution.
The effect is ``metric(ablated) - metric(clean)``, with ``metric`` the mean logit difference
between the answer and the wrong answer at the last position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapters.base import TLModel


def logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answers: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
) -> Float[Tensor, ""]:
    last = logits[:, -1]
    rows = torch.arange(len(answers))
    return (last[rows, answers] - last[rows, wrong]).mean()


def _replace(index: int, value: Tensor | None, axis: int) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        slot = act.select(axis, index)
        slot.copy_(torch.zeros_like(slot) if value is None else value.expand_as(slot))
        return act

    return hook


@torch.no_grad()
def ablation_effects(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    reference: Int[Tensor, "ref pos"],
    neurons: bool = True,
) -> dict[str, Any]:
    """Per-head and per-neuron effects of zero- and mean-ablation on the mean logit difference."""
    cfg = model.cfg
    clean = float(logit_diff(model(tokens), answers, wrong))
    _, ref_cache = model.run_with_cache(
        reference, names_filter=lambda n: n.endswith(("hook_z", "mlp.hook_post"))
    )

    def effect(hook_name: str, index: int, value: Tensor | None, axis: int) -> float:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, _replace(index, value, axis))])
        return float(logit_diff(logits, answers, wrong)) - clean

    out: dict[str, Any] = {
        "metric": "mean logit(answer) - logit(wrong) at the last position",
        "clean": clean,
        "n_examples": len(tokens),
    }
    for kind in ("zero", "mean"):
        heads = []
        for layer in range(cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            mean = ref_cache[name].mean((0, 1))  # head d_head
            heads.append(
                [
                    effect(name, h, None if kind == "zero" else mean[h], axis=2)
                    for h in range(cfg.n_heads)
                ]
            )
        out[f"heads_{kind}"] = heads
    if neurons and not cfg.attn_only:
        for kind in ("zero", "mean"):
            per_layer = []
            for layer in tqdm(range(cfg.n_layers), desc=f"{kind}-ablating neurons", leave=False):
                name = f"blocks.{layer}.mlp.hook_post"
                mean = ref_cache[name].mean((0, 1))
                per_layer.append(
                    [
                        effect(name, n, None if kind == "zero" else mean[n], axis=2)
                        for n in range(cfg.d_mlp or 0)
                    ]
                )
            out[f"neurons_{kind}"] = per_layer
    return out


def circuit_heads(
    effects: dict[str, Any], kind: str = "mean", fraction: float = 0.1
) -> list[tuple[str, float]]:
    """Heads whose ablation changes the metric by more than ``fraction`` of its clean value."""
    threshold = fraction * abs(effects["clean"])
    found = [
        (f"L{layer}H{head}", value)
        for layer, row in enumerate(effects[f"heads_{kind}"])
        for head, value in enumerate(row)
        if abs(value) > threshold
    ]
    return sorted(found, key=lambda item: -abs(item[1]))


def top_components(effects: dict[str, Any], key: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` heads (``heads_mean``, ...) or neurons (``neurons_mean``, ...) by |effect|."""
    letter = "H" if key.startswith("heads") else "N"
    flat = [
        (f"L{layer}{letter}{index}", value)
        for layer, row in enumerate(effects[key])
        for index, value in enumerate(row)
    ]
    return sorted(flat, key=lambda item: -abs(item[1]))[:k]
