"""The zoo models' mechanisms, machine-readable: each stage's heads and the edges that join them.

A :class:`Mechanism` lists the stages in order, each with its heads, and the edges between
components, each ``(sender, receiver, type)``: the sender is ``"embed"``, a head ``"L0H1"`` or an
MLP ``"L0.mlp"``; the receiver is a head (reached through its query, key or value input, type
``"q"``, ``"k"``, ``"v"``), an MLP (type ``"mlp"``) or ``"logits"`` (type ``"direct"``).

Every listed edge was established by path patching with plain TransformerLens hooks
(:mod:`depass_lens.zoo.paths`), independently of DePass, and is listed only where that effect was
substantial. The measured effects ship beside the weights (``weights/<name>.paths.json``, written
by ``python -m depass_lens.zoo.paths <name>``) and ``tests/test_zoo_mechanisms.py`` re-measures
every edge, so this table cannot silently go stale.

>>> from depass_lens import zoo
>>> zoo.mechanism("induction").edges[1]
('L0H1', 'L1H3', 'k')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EDGE_TYPES = ("q", "k", "v", "mlp", "direct")


@dataclass(frozen=True)
class Mechanism:
    """Stages ``(name, heads)`` in the order they compose; edges ``(sender, receiver, type)``."""

    stages: tuple[tuple[str, tuple[str, ...]], ...]
    edges: tuple[tuple[str, str, str], ...]
    notes: str

    def __post_init__(self) -> None:
        for sender, receiver, kind in self.edges:
            if kind not in EDGE_TYPES:
                raise ValueError(f"edge type must be one of {EDGE_TYPES}, not {kind!r}")
            if (receiver == "logits") != (kind == "direct"):
                raise ValueError(f"only edges into the logits are 'direct': {sender, receiver}")

    @property
    def heads(self) -> tuple[str, ...]:
        """Every head of every stage, in stage order."""
        return tuple(head for _, heads in self.stages for head in heads)


_STAGE1, _STAGE2 = ("L0H0", "L0H1", "L0H2"), ("L1H0", "L1H1", "L1H3")
_STAGE3 = ("L2H0", "L2H1", "L2H2", "L2H3")

MECHANISMS: dict[str, Mechanism] = {
    "binding": Mechanism(
        stages=(
            ("find assignments, copy values", _STAGE1),
            ("resolve the alias at its source", _STAGE2),
            ("read the resolved value at the query", _STAGE3),
        ),
        edges=(
            ("embed", "L0H0", "q"),
            ("embed", "L0H0", "k"),
            ("embed", "L0H1", "v"),
            ("embed", "L0H2", "v"),
            *(("L0H0", head, "q") for head in _STAGE2),
            *((sender, head, "v") for sender in ("L0H1", "L0H2") for head in _STAGE2),
            *(("L0H0", head, "q") for head in _STAGE3),
            *((sender, head, "v") for sender in _STAGE2 for head in _STAGE3),
            *((head, "logits", "direct") for head in _STAGE3),
            ("L0H0", "logits", "direct"),
        ),
        notes=(
            "For `7 -> a ; ... a -> b ; ? b`. Path patching on 200 held-out prompts, each edge "
            "under the counterfactual where it carries the largest share of the effect "
            "(`corrupted` redirects the alias, `realias` swaps the aliases' names, `rename` swaps "
            "the bound variables' names, `revalue` their values); edges listed where that share "
            "is at least 3%, and the edges between two stages are also patched together. Stage "
            "1 (layer 0): L0H0 is a duplicate-token head: from the alias's source `a` it attends "
            "where `a` is assigned (0.94 of its attention), from the query `b` where `b` is "
            "assigned (0.95); its query comes from the token (embed -> q: changing the alias's "
            "source) and its key from the assigned variable (embed -> k: swapping names). L0H1 "
            "and L0H2 copy each value into the rest of its statement (from `->`, the variable "
            "and `;` they attend the value: 0.85-0.92, 0.43-0.60, 0.91-0.92). Stage 2 (layer 1, "
            "at the "
            "alias's source `a`): L1H0, L1H1 and L1H3 attend the statement that assigns `a` "
            "(0.95-0.97 of their attention on its `->`, variable and `;`), steered there by L0H0 "
            "through their queries, and read the value L0H1 and L0H2 left there through their "
            "values. Stage 3 (layer 2, at the query): all four heads attend the alias's source "
            "(0.90-0.91), steered by L0H0 (which found where `b` is assigned) through their "
            "queries, read the value stage 2 fetched through their values and write it to the "
            "logits. So the value reaches the logits through all three stages: embed -> "
            "L0H1/L0H2 -> layer 1 (v) -> layer 2 (v) -> logits, with L0H0 choosing where layers 1 "
            "and 2 look. L1H2 does the stage-2 lookup weakly (L0H0 -> L1H2 q 9%) but its output "
            "into layer 2 is 1-3% per edge, so it is left out; L0H3 matters under mean-ablation "
            "but nothing it carries differs between a prompt and its counterfactuals (every edge "
            "below 5%): it reads the statement layout, which all prompts share. The model learnt "
            "this backward resolution because prompts are in program order (see the task)."
        ),
    ),
    "induction": Mechanism(
        stages=(
            ("previous token", ("L0H1",)),
            ("induction", ("L1H0", "L1H1", "L1H2", "L1H3")),
        ),
        edges=(
            ("embed", "L0H1", "v"),
            ("L0H1", "L1H3", "k"),
            ("L0H1", "L1H2", "k"),
            ("L0H1", "L1H1", "k"),
            ("L0H1", "L1H0", "k"),
            ("L1H3", "logits", "direct"),
            ("L1H2", "logits", "direct"),
            ("L1H1", "logits", "direct"),
            ("L1H0", "logits", "direct"),
        ),
        notes=(
            "Path patching from the corrupted prompts (first copy replaced by fresh tokens) on 200 "
            "held-out prompts; edges listed where the effect is at least 5% of the corruption's. "
            "The previous-token head L0H1 reads the token before each position (embed -> L0H1 "
            "through its value) and feeds all four layer-1 induction heads through their keys; "
            "the induction heads write the answer directly to the logits. L0H2 and L0H3 also "
            "read the changed tokens (embed -> value, 17-18%), but what they pass on to the "
            "induction heads' values is spread over many edges of at most 5% each, so none is "
            "listed."
        ),
    ),
    "ioi": Mechanism(
        stages=(
            ("S2 features (at the second subject mention)", ("L0H1", "L0H3", "L0.mlp")),
            ("S2 movers (END attends S2)", ("L1H0", "L1H1")),
            ("MLP readout", ("L1.mlp", "L2.mlp")),
        ),
        edges=(
            ("embed", "L0H1", "q"),
            ("embed", "L0H3", "q"),
            ("embed", "L0.mlp", "mlp"),
            ("L0H1", "L0.mlp", "mlp"),
            ("L0H3", "L0.mlp", "mlp"),
            ("L0.mlp", "L1H0", "v"),
            ("L0.mlp", "L1H1", "v"),
            ("L1H0", "L1.mlp", "mlp"),
            ("L1H1", "L1.mlp", "mlp"),
            ("L1H0", "L2.mlp", "mlp"),
            ("L1.mlp", "L2.mlp", "mlp"),
            ("L1H0", "logits", "direct"),
            ("L1H1", "logits", "direct"),
            ("L1.mlp", "logits", "direct"),
            ("L2.mlp", "logits", "direct"),
        ),
        notes=(
            "Path patching from the ABC prompts (the second subject mention S2 replaced by a "
            "third name) on 200 held-out prompts; edges listed where the effect is at least 10% "
            "of the corruption's. This finds the subject side of the circuit only, since the "
            "corruption changes nothing else: at S2 the token (through the layer-0 MLP) and the "
            "layer-0 heads L0H1 and L0H3 (their queries at S2) compute S2 features; L1H0 and L1H1 "
            "attend from the last position to S2 (0.99 and 0.96 of their attention) and move "
            "them through their values; the layer-1 and layer-2 MLPs and the movers' direct path "
            "turn them into the logit difference. The indirect object side (all four layer-0 "
            "heads attend from the last position to both earlier names, 0.29-0.40 each) is not "
            "changed by the ABC prompts and is not measured here. No head reads the S2 movers' "
            "output through its query, key or value (every such edge is below 1%): the model has "
            "no S-inhibition head."
        ),
    ),
    "recall": Mechanism(
        stages=(
            ("subject movers", ("L0H0", "L0H2", "L0H3")),
            ("fact lookup", ("L0.mlp", "L1.mlp")),
        ),
        edges=(
            ("embed", "L0H0", "v"),
            ("embed", "L0H2", "v"),
            ("embed", "L0H0", "k"),
            ("embed", "L0H2", "k"),
            ("L0H0", "L0.mlp", "mlp"),
            ("L0H2", "L0.mlp", "mlp"),
            ("L0H3", "L0.mlp", "mlp"),
            ("L0.mlp", "L1.mlp", "mlp"),
            ("L0.mlp", "logits", "direct"),
            ("L1.mlp", "logits", "direct"),
        ),
        notes=(
            "Path patching from the corrupted prompts (the subject swapped for another subject, "
            "same relation) on 200 held-out prompts; edges listed where the effect is at least "
            "10% of the corruption's. The model has grouped-query attention with two key/value "
            "heads: L0H0 and L0H1 share one, L0H2 and L0H3 the other, so a key or value edge "
            "into L0H0 (L0H2) is the same measurement as into L0H1 (L0H3). Layer-0 heads read "
            "the subject through their values (and keys) and move it to the last position, "
            "where the layer-0 MLP reads it from L0H0, L0H2 and L0H3 (L0H1's output carries "
            "little subject information: its edge into the MLP is 5%); the two MLPs hold the "
            "facts and write the answer. Layer-1 heads play no part (every edge into or out of "
            "them is below 3%)."
        ),
    ),
}


def paths_path(root: Path, name: str) -> Path:
    """Where the measured edge effects of zoo model ``name`` live."""
    return root / "weights" / f"{name}.paths.json"


def read_paths(root: Path, name: str) -> dict[str, Any] | None:
    path = paths_path(root, name)
    return json.loads(path.read_text()) if path.exists() else None


def _number(value: float) -> str:
    return f"{value:+.2f}"


def card_section(name: str, measured: dict[str, Any] | None) -> list[str]:
    """The model card's "Mechanism" section: stages, and every edge with its patching effect."""
    if name not in MECHANISMS:
        return []
    mechanism = MECHANISMS[name]
    lines = ["## Mechanism (path patching)", ""]
    lines.append(
        "Stages, in the order they compose: "
        + " -> ".join(f"{stage} ({', '.join(heads)})" for stage, heads in mechanism.stages)
        + " -> logits."
    )
    lines += ["", mechanism.notes, ""]
    if measured is None:
        return [*lines, f"(not measured yet: `python -m depass_lens.zoo.paths {name}`)", ""]
    lines += [
        f"Each edge patched alone (`python -m depass_lens.zoo.paths {name}`; "
        f"`depass_lens/zoo/paths.py` says how): effect = change of the mean logit difference "
        f"on {measured['n_examples']} held-out prompts, and the fraction of the change that "
        "running the counterfactual prompts causes. `zoo.mechanism"
        f'("{name}")` has the table.',
        "",
    ]
    for label, run in measured["counterfactuals"].items():
        lines.append(
            f"- counterfactual `{label}`: {run['description']} Clean {run['clean']:.2f}, "
            f"counterfactual {run['corrupted']:.2f}."
        )
    lines += [
        "",
        "| sender | receiver | through | counterfactual | effect | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for row in measured["edges"]:
        sender, receiver, kind = row["edge"]
        lines.append(
            f"| {sender} | {receiver} | {kind} | `{row['counterfactual']}` | "
            f"{_number(row['effect'])} | {row['fraction']:.2f} |"
        )
    lines.append("")
    if measured.get("bundles"):
        lines += [
            "The edges between two stages (or from the embedding into a stage, or from a stage "
            "to the logits) patched together:",
            "",
            "| from | to | through | counterfactual | effect | fraction |",
            "|---|---|---|---|---|---|",
        ]
        for row in measured["bundles"]:
            lines.append(
                f"| {row['sender']} | {row['receiver']} | {row['type']} | "
                f"`{row['counterfactual']}` | {_number(row['effect'])} | {row['fraction']:.2f} |"
            )
        lines.append("")
    if measured.get("scan"):
        lines.append(
            "Strongest edges of the exhaustive scan (every sender to every later receiver, every "
            "input; effect and fraction), for comparison: "
            + ", ".join(
                f"{s} -> {r} ({k}, `{cf}`) {_number(e)} ({f:.2f})"
                for s, r, k, cf, e, f in measured["scan"]
            )
        )
        lines.append("")
    return lines
