"""Why the contrastive feature graph's top latents fall short of integrated gradients' at some
budgets of the fixed-latent faithfulness curve (issue 18.4, ``feature_faithfulness.md``).

The fixed protocol holds a method's top-``n`` latents at their clean activations and every other
latent at its corrupted one, errors frozen at their clean values. With the model's attention
patterns and norm scales *also* frozen (at their values in that all-corrupted state, ``m(none)``),
every path from a held latent to the metric is linear: the metric is affine in the kept latents,
and a kept set's faithfulness is exactly the sum of its latents' own effects. What separates that
from the real measurement is the model's nonlinear response to the kept set itself: the patterns
and norm scales moving when the kept latents change together, the part no one-pass additive score
(a graph's share, a gradient) can see. This script measures each top-``n`` set four ways (real;
patterns frozen; norm scales frozen; both frozen = additive) for the contrastive graph, integrated
gradients and attribution patching, beside the graph's own prediction::

    python -m benchmarks.feature_shortfall [--only ioi recall] [--prompts 32 --seed 31]

Same prompts, dictionaries and float64 as :mod:`benchmarks.feature_faithfulness`. Writes
``benchmarks/results/feature_shortfall.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.run import machine
from depass_lens import zoo
from depass_lens.evaluation.circuit_faithfulness import budget_grid
from depass_lens.evaluation.feature_faithfulness import graph_scores, method_scores, reference_acts
from depass_lens.evaluation.feature_patching import (
    Patch,
    SplicedModel,
    flatten,
    top_n_mask,
    unflatten,
)
from depass_lens.evaluation.metrics import logit_diff_metric
from depass_lens.zoo.saes import load_dictionaries

OUT = Path(__file__).parent / "results"
#: Faithfulness differences this small are ties (as in the faithfulness tables' win counts).
TIE = 1e-3
NOTHING = torch.empty(0)
METHODS = ("depass-contrast", "integrated gradients", "attribution patching")
#: Which of the model's nonlinear maps are held at their all-corrupted values, per column.
FROZEN: dict[str, tuple[str, ...]] = {
    "real": (),
    "patterns frozen": ("hook_pattern",),
    "norm scales frozen": ("hook_scale",),
    "both frozen (additive)": ("hook_pattern", "hook_scale"),
}


def frozen_hooks(spliced: SplicedModel, suffixes: Sequence[str]) -> list[str]:
    """The model's hook points whose names end with one of ``suffixes``."""
    return [n for n in spliced.adapter.hook_names() if n.endswith(tuple(suffixes))]


@torch.no_grad()
def shortfall(name: str, prompts: int, seed: int) -> dict[str, Any]:
    """One zoo model: per budget and method, the kept set's faithfulness under each of
    :data:`FROZEN`, and the contrastive graph's prediction of it."""
    model = zoo.load(name).to(torch.float64)
    dictionaries = [d.to(torch.float64) for d in load_dictionaries(name)]
    batch = zoo.task(name).batch(model, prompts, split="test", seed=seed)
    assert batch.wrong is not None and batch.corrupted is not None
    metric = logit_diff_metric(batch.answers, batch.wrong)
    spliced = SplicedModel(model, dictionaries, batch.tokens)
    names = spliced.names
    with torch.enable_grad():
        graphs = graph_scores(
            spliced, batch.answers, batch.wrong, ["depass-contrast"], batch.corrupted
        )
        corrupted = reference_acts(spliced, "corrupted", batch.corrupted)
        scores = method_scores(spliced, metric, graphs, corrupted, True)
    clean = {n: r.acts for n, r in spliced.clean.items()}
    candidates = flatten({n: clean[n] != corrupted[n] for n in names}, names)

    def fixed(kept: Tensor) -> dict[str, Patch]:
        held = unflatten(kept, clean, names)
        return {
            n: Patch(torch.ones_like(held[n]), torch.where(held[n], clean[n], corrupted[n]))
            for n in names
        }

    # every pattern and norm scale of the all-corrupted state, read off its run
    none_state = dict.fromkeys(frozen_hooks(spliced, FROZEN["both frozen (additive)"]), NOTHING)
    nothing = torch.zeros_like(candidates)
    m_none = float(metric(spliced.run(fixed(nothing), read=none_state)).mean())
    budgets = budget_grid(int(candidates.sum(1).max()))
    contrast = flatten(scores["depass-contrast"].estimate, names)
    kept_sets = {
        method: [top_n_mask(flatten(scores[method].key, names), candidates, n) for n in budgets]
        for method in METHODS
    }
    out: dict[str, Any] = {"name": name, "budgets": list(budgets), "faithfulness": {}}
    for column, suffixes in FROZEN.items():
        held = {n: none_state[n] for n in frozen_hooks(spliced, suffixes)}

        def measured(kept: Tensor, held: dict[str, Tensor] = held) -> float:
            return float(metric(spliced.run(fixed(kept), hold=held)).mean())

        gap = measured(candidates) - m_none
        out.setdefault("gap", {})[column] = gap
        out["faithfulness"][column] = {
            method: [(measured(k) - m_none) / gap for k in sets]
            for method, sets in kept_sets.items()
        }
        if column == "real":  # the graph's own estimate of each method's kept set, and its
            # negative part (latents the graph says push against the answer)
            out["predicted"] = {
                method: [float((contrast * k).sum(1).mean()) / gap for k in sets]
                for method, sets in kept_sets.items()
            }
            out["negative"] = {
                method: [float((contrast.clamp(max=0) * k).sum(1).mean()) / gap for k in sets]
                for method, sets in kept_sets.items()
            }
    return out


def _losses(result: dict[str, Any], column: str, ours: str, other: str) -> list[float]:
    f = result["faithfulness"][column]
    return [b - a for a, b in zip(f[ours], f[other])]


def markdown(results: Sequence[dict[str, Any]], command: str, seconds: float) -> str:
    """Per model: every budget's four measurements of the contrastive graph's and integrated
    gradients' sets, the graph's predictions, and a summary over the budgets where the graph's
    set loses."""
    ours, other = "depass-contrast", "integrated gradients"
    lines = [
        "# Where the contrastive feature graph falls short, and why",
        "",
        f"`{command}`; {machine()}; {seconds:.0f} s in all.",
        "",
        "Fixed-latent faithfulness (kept latents held at their clean activations, the rest at "
        "their corrupted ones, errors clean; `feature_faithfulness.md`) of each method's top-n "
        "latents, measured four ways: the real spliced model; with every attention pattern held "
        "at its value in the all-corrupted state m(none); with every norm scale held there; with "
        "both held, where each kept set's faithfulness is the sum of its latents' own effects "
        "(the metric is affine in the kept latents). Each column is normalised by its own "
        "m(all) - m(none). `predicted`: the contrastive graph's shares of the set, over the real "
        "m(all) - m(none); `negative`: the part of that from latents the graph scores below 0. C = "
        "depass-contrast, IG = integrated gradients, AP = attribution patching.",
        "",
    ]
    for r in results:
        f, p = r["faithfulness"], r["predicted"]
        lines += [
            f"## `{r['name']}`",
            "",
            "| latents | C real | IG real | AP real | C patterns frozen | IG patterns frozen "
            "| C norms frozen | IG norms frozen | C additive | IG additive | C predicted "
            "| IG predicted | C negative | IG negative |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, n in enumerate(r["budgets"]):
            cells = [
                f["real"][ours][i],
                f["real"][other][i],
                f["real"]["attribution patching"][i],
                f["patterns frozen"][ours][i],
                f["patterns frozen"][other][i],
                f["norm scales frozen"][ours][i],
                f["norm scales frozen"][other][i],
                f["both frozen (additive)"][ours][i],
                f["both frozen (additive)"][other][i],
                p[ours][i],
                p[other][i],
                r["negative"][ours][i],
                r["negative"][other][i],
            ]
            lines.append(f"| {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        lines.append("")
        gaps = ", ".join(f"{c} {g:.3f}" for c, g in r["gap"].items())
        lines.append(f"- m(all) - m(none): {gaps}.")
        lines += summary(r, ours, other)
        lines.append("")
    return "\n".join(lines)


def summary(r: dict[str, Any], ours: str, other: str) -> list[str]:
    """The budgets where ``ours``'s set is less faithful than ``other``'s (real model), and what
    the gap becomes with the nonlinear maps frozen."""
    real = _losses(r, "real", ours, other)
    losing = [i for i, d in enumerate(real) if d > TIE]
    if not losing:
        return [f"- {ours} at least as faithful as {other} at every budget."]
    out = [
        f"- {ours} below {other} at {len(losing)} of {len(real)} budgets "
        f"({', '.join(str(r['budgets'][i]) for i in losing)} latents); mean shortfall there:"
    ]
    for column in FROZEN:
        d = _losses(r, column, ours, other)
        mean = sum(d[i] for i in losing) / len(losing)
        ahead = sum(d[i] <= TIE for i in losing)
        out.append(
            f"  - {column}: {mean:+.3f} (C at least as faithful at {ahead} of {len(losing)})"
        )
    p = r["predicted"]
    rank = sum(p[ours][i] >= p[other][i] - TIE for i in losing)
    out.append(
        f"  - the graph predicts its own set at least as faithful at {rank} of {len(losing)} "
        f"(mean predicted {sum(p[ours][i] for i in losing) / len(losing):.3f} against "
        f"{sum(p[other][i] for i in losing) / len(losing):.3f})"
    )
    n = r["negative"]
    out.append(
        f"  - the graph's negative shares in the sets there: C {mean_at(n[ours], losing):.3f}, "
        f"IG {mean_at(n[other], losing):.3f}"
    )
    return out


def mean_at(values: Sequence[float], at: Sequence[int]) -> float:
    return sum(values[i] for i in at) / len(at)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", default=["ioi", "recall", "induction", "binding"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    results = []
    for name in args.only:
        t = time.perf_counter()
        results.append(shortfall(name, args.prompts, args.seed))
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_shortfall.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "python -m benchmarks.feature_shortfall " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = markdown(results, command.strip(), time.perf_counter() - start)
    (out / "feature_shortfall.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
