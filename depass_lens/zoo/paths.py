"""Path patching with plain TransformerLens hooks: the effect of one sender -> receiver edge.

An edge is ``(sender, receiver, type)``: the sender is ``"embed"``, a head ``"L0H1"`` or an MLP
``"L0.mlp"``; the receiver is a head reached through its query, key or value input (type ``"q"``,
``"k"``, ``"v"``), an MLP (``"L1.mlp"``, type ``"mlp"``) or the logits (type ``"direct"``).
Patching the edge runs the clean prompts with one change: the receiver's chosen input (with
``model.set_use_split_qkv_input(True)``, the per-head ``blocks.L.hook_q_input``/``hook_k_input``/
``hook_v_input``, on a ``TransformerBridge`` its adapter's own hooks of those names;
``blocks.L.hook_mlp_in``; for the logits, the final residual stream) gets the
difference between the sender's output on the corrupted prompts and on the clean prompts added to
it. Every other component sees the clean sender; everything downstream of the receiver is
recomputed. The residual stream is a sum, and these hooks sit before the receiver's layer norm,
so this replaces exactly the sender's direct contribution to that one input.

The effect is the change of the mean logit difference (answer - wrong answer, last position);
``fraction`` divides it by the change that running the corrupted prompts causes (1 = the edge
alone carries the whole effect of the corruption).

    python -m depass_lens.zoo.paths binding        # measure the documented edges, write the json
    python -m depass_lens.zoo.paths binding --scan # every head-to-head edge, strongest first
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.zoo.ablation import logit_diff
from depass_lens.zoo.mechanisms import MECHANISMS, Mechanism, paths_path
from depass_lens.zoo.model_card import write_card
from depass_lens.zoo.registry import SPECS, ZooSpec
from depass_lens.zoo.store import load_model
from depass_lens.zoo.tasks import TASKS, Task

Edge = tuple[str, str, str]
TYPES = ("q", "k", "v", "mlp", "direct")
_HEAD = re.compile(r"L(\d+)H(\d+)$")
_MLP = re.compile(r"L(\d+)\.mlp$")


def sender_hooks(model: TLModel, sender: str) -> list[str]:
    """Hook names whose activations make up the sender's output."""
    if sender == "embed":
        hooks = ["hook_embed"]
        if model.cfg.positional_embedding_type in ("standard", "shortformer"):
            hooks.append("hook_pos_embed")
        return hooks
    if m := _HEAD.match(sender):
        return [f"blocks.{m[1]}.attn.hook_z"]
    if m := _MLP.match(sender):
        return [f"blocks.{m[1]}.hook_mlp_out"]
    raise ValueError(f"unknown sender {sender!r}")


def sender_output(
    model: TLModel, sender: str, cache: dict[str, Tensor]
) -> Tensor:  # batch pos d_model
    """What the sender writes into the residual stream, from a cache of its hooks."""
    if m := _HEAD.match(sender):
        layer, head = int(m[1]), int(m[2])
        z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
        return z @ model.W_O[layer, head]
    return sum(cache[name] for name in sender_hooks(model, sender))  # type: ignore[return-value]


def receiver_hook(model: TLModel, receiver: str, kind: str) -> tuple[str, int | None]:
    """The hook the receiver reads its input from, and the head index on that hook (if any)."""
    if kind not in TYPES:
        raise ValueError(f"edge type must be one of {TYPES}, not {kind!r}")
    if receiver == "logits":
        if kind != "direct":
            raise ValueError("the logits are reached by 'direct' edges only")
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    if m := _HEAD.match(receiver):
        if kind not in ("q", "k", "v"):
            raise ValueError(f"a head is reached through q, k or v, not {kind!r}")
        layer, head = int(m[1]), int(m[2])
        cfg = model.cfg
        if kind != "q" and cfg.n_key_value_heads and not cfg.ungroup_grouped_query_attention:
            head //= cfg.n_heads // cfg.n_key_value_heads  # a shared key/value head
        return f"blocks.{layer}.hook_{kind}_input", head
    if m := _MLP.match(receiver):
        if kind != "mlp":
            raise ValueError("an MLP is reached by 'mlp' edges only")
        return f"blocks.{m[1]}.hook_mlp_in", None
    raise ValueError(f"unknown receiver {receiver!r}")


def _layer(name: str) -> float:
    if name == "embed":
        return -1
    if name == "logits":
        return float("inf")
    m = _HEAD.match(name) or _MLP.match(name)
    if m is None:
        raise ValueError(f"unknown component {name!r}")
    return int(m[1]) + (0.5 if name.endswith("mlp") else 0.0)


@contextmanager
def split_inputs(model: TLModel) -> Iterator[None]:
    """Per-head q/k/v inputs and the MLP input hook, switched off again afterwards."""
    before = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    model.set_use_split_qkv_input(True)
    if not model.cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before[0])
        if not model.cfg.attn_only:
            model.set_use_hook_mlp_in(before[1])


class PathPatcher:
    """Clean and corrupted runs cached once; ``effect(edge)`` patches one edge."""

    def __init__(
        self,
        model: TLModel,
        tokens: Int[Tensor, "batch pos"],
        corrupted: Int[Tensor, "batch pos"],
        answers: Int[Tensor, " batch"],
        wrong: Int[Tensor, " batch"],
    ) -> None:
        self.model, self.tokens, self.answers, self.wrong = model, tokens, answers, wrong
        adapter = make_adapter(model)
        self._bridge = adapter if adapter.backend == "TransformerBridge" else None

        def wanted(name: str) -> bool:
            return name.endswith(("hook_z", "hook_mlp_out", "hook_embed", "hook_pos_embed"))

        def run(prompts: Tensor) -> tuple[float, dict[str, Tensor]]:
            with torch.no_grad():
                logits, cache = model.run_with_cache(prompts, names_filter=wanted)
            return float(logit_diff(cast(Tensor, logits), answers, wrong)), dict(cache.items())

        self.clean, self.clean_cache = run(tokens)
        self.corrupt, self.corrupt_cache = run(corrupted)

    @torch.no_grad()
    def effect(self, *edges: Edge) -> float:
        """metric(clean run with the edges patched) - metric(clean run). Several edges are
        patched together (deltas into the same input add up, as the residual stream does)."""
        patches: dict[str, list[tuple[int | None, Tensor]]] = {}
        for sender, receiver, kind in edges:
            if _layer(sender) >= _layer(receiver):
                raise ValueError(f"{sender} does not come before {receiver}")
            delta = sender_output(self.model, sender, self.corrupt_cache) - sender_output(
                self.model, sender, self.clean_cache
            )
            hook_name, head = receiver_hook(self.model, receiver, kind)
            patches.setdefault(hook_name, []).append((head, delta))

        def patch(act: Tensor, hook) -> Tensor:
            act = act.clone()
            for head, delta in patches[hook.name]:
                if head is None:
                    act += delta
                else:
                    act[:, :, head] += delta
            return act

        hooks = [(name, patch) for name in patches]
        if self._bridge is not None:  # a bridge's per-head inputs are its adapter's own hooks
            with self._bridge.split_inputs(), self._bridge.hooks(hooks):
                logits = self.model(self.tokens)
        else:
            with split_inputs(self.model):
                logits = self.model.run_with_hooks(self.tokens, fwd_hooks=hooks)
        return float(logit_diff(logits, self.answers, self.wrong)) - self.clean

    def fraction(self, effect: float) -> float:
        return effect / (self.corrupt - self.clean)


def counterfactual_tasks(task: Task) -> dict[str, Task]:
    """The task's corrupted prompts (``"corrupted"``) and any further counterfactuals it offers
    (``task.counterfactuals``: name -> description; ``type(task)(corruption=name)`` draws them for
    the same clean prompts)."""
    extra = getattr(task, "counterfactuals", {})
    return {"corrupted": task, **{label: type(task)(corruption=label) for label in extra}}  # type: ignore[call-arg]


def all_edges(model: TLModel) -> list[Edge]:
    """Every edge into a head's q/k/v, an MLP or the logits from every earlier component."""
    cfg = model.cfg
    heads = [f"L{layer}H{head}" for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    mlps = [] if cfg.attn_only else [f"L{layer}.mlp" for layer in range(cfg.n_layers)]
    edges: list[Edge] = []
    for sender in ["embed", *heads, *mlps]:
        for receiver in [*heads, *mlps, "logits"]:
            if _layer(sender) >= _layer(receiver):
                continue
            kinds = ("direct",) if receiver == "logits" else ("mlp",) if receiver in mlps else "qkv"
            edges += [(sender, receiver, kind) for kind in kinds]
    return edges


def bundles(mechanism: Mechanism) -> dict[tuple[str, str, str], tuple[Edge, ...]]:
    """The mechanism's edges grouped by (sender stage, receiver stage, type); a component outside
    the stages (``embed``, ``logits``, an MLP) is its own group."""
    stage_of = {member: name for name, members in mechanism.stages for member in members}
    groups: dict[tuple[str, str, str], list[Edge]] = {}
    for sender, receiver, kind in mechanism.edges:
        key = (stage_of.get(sender, sender), stage_of.get(receiver, receiver), kind)
        groups.setdefault(key, []).append((sender, receiver, kind))
    return {key: tuple(edges) for key, edges in groups.items()}


def measure(
    model: TLModel,
    spec: ZooSpec,
    n: int = 200,
    scan: bool = True,
    top: int = 12,
    progress: bool = False,
) -> dict[str, Any]:
    """Every documented edge of ``MECHANISMS[spec.name]`` under each counterfactual (the one where
    it carries the largest share of the counterfactual's effect is kept), the edges between two
    stages patched together (``bundles``), and optionally the ``top`` edges of an exhaustive
    scan."""
    task = TASKS[spec.task]()
    variants = counterfactual_tasks(task)
    descriptions = {
        "corrupted": "the task's corrupted prompts (see Corrupted distribution).",
        **getattr(task, "counterfactuals", {}),
    }
    clean = task.batch(model, n, split="test", seed=11)  # the prompts the ablations use
    assert clean.wrong is not None
    patchers: dict[str, PathPatcher] = {}
    for label, variant in variants.items():
        batch = variant.batch(model, n, split="test", seed=11)
        assert batch.corrupted is not None and torch.equal(batch.tokens, clean.tokens)
        patchers[label] = PathPatcher(
            model, clean.tokens, batch.corrupted, clean.answers, clean.wrong
        )
    out: dict[str, Any] = {
        "metric": "mean logit(answer) - logit(wrong) at the last position",
        "n_examples": n,
        "prompts": "test split, seed 11 (the ablation prompts)",
        "counterfactuals": {
            label: {"description": descriptions[label], "clean": p.clean, "corrupted": p.corrupt}
            for label, p in patchers.items()
        },
        "edges": [],
        "bundles": [],
    }

    def best(edges: tuple[Edge, ...]) -> dict[str, Any]:
        """The counterfactual under which ``edges`` carry the largest share of its effect."""
        found = [(label, p.effect(*edges)) for label, p in patchers.items()]
        label, effect = max(found, key=lambda item: abs(patchers[item[0]].fraction(item[1])))
        return {
            "counterfactual": label,
            "effect": effect,
            "fraction": patchers[label].fraction(effect),
        }

    if spec.name in MECHANISMS:
        mechanism = MECHANISMS[spec.name]
        out["edges"] = [{"edge": list(edge), **best((edge,))} for edge in mechanism.edges]
        out["bundles"] = [
            {"sender": sender, "receiver": receiver, "type": kind, **best(edges)}
            for (sender, receiver, kind), edges in bundles(mechanism).items()
            if len(edges) > 1
        ]
    if scan:
        scanned = []
        for edge in tqdm(all_edges(model), desc="scanning edges", disable=not progress):
            found = best((edge,))
            scanned.append([*edge, found["counterfactual"], found["effect"], found["fraction"]])
        out["scan"] = sorted(scanned, key=lambda row: -abs(row[5]))[:top]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("--no-scan", action="store_true", help="only the documented edges")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.name]
    model = load_model(spec)
    measured = measure(model, spec, scan=not args.no_scan, progress=True)
    paths_path(spec.root, spec.name).write_text(json.dumps(measured, indent=1))
    write_card(spec, model)
    for row in measured["edges"]:
        effect, fraction = row["effect"], row["fraction"]
        print(*row["edge"], row["counterfactual"], f"{effect:+.3f}", f"{fraction:.2f}")
    for row in measured.get("scan", []):
        print("scan:", *row[:4], f"{row[4]:+.3f}", f"{row[5]:.2f}")


if __name__ == "__main__":
    main()
