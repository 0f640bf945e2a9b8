"""Why the contrastive feature graph's top latents fall short of integrated gradients' at some
budgets of the faithfulness curves (issue 18.4, ``feature_faithfulness.md``).

The curves keep a method's top-``n`` latents clean and hold every other latent at its corrupted
activation, errors frozen at their clean values; kept latents are either *fixed* at their clean
activations or *live* (recomputed by their encoders). Each top-``n`` set is measured again with
the model's attention patterns and/or norm scales held at their values in the all-corrupted state
``m(none)`` (:meth:`SplicedModel.run`'s ``hold``). With kept latents fixed and both held, every
path from a kept latent to the metric is linear: a set's faithfulness is exactly the sum of its
latents' own effects, and what separates it from the real measurement is the model's nonlinear
response to the kept set itself, the part no one-pass additive score (a graph's share, a gradient)
carries. With kept latents live and both held, what is left nonlinear is the encoders (a TopK or
ReLU latent switching on or off). Compared: the contrastive graph's direct shares (fixed) and its
totals through later latents (live) against integrated gradients and attribution patching, beside
the graph's own prediction::

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
BASELINES = ("integrated gradients", "attribution patching")
#: Per circuit semantics, the DePass variant made for it (as in ``feature_faithfulness.md``).
OURS = {"fixed": "depass-contrast", "live": "depass-contrast-total"}
#: Which of the model's nonlinear maps are held at their all-corrupted values, per column.
FROZEN: dict[str, tuple[str, ...]] = {
    "real": (),
    "patterns frozen": ("hook_pattern",),
    "norm scales frozen": ("hook_scale",),
    "both frozen": ("hook_pattern", "hook_scale"),
}


def frozen_hooks(spliced: SplicedModel, suffixes: Sequence[str]) -> list[str]:
    """The model's hook points whose names end with one of ``suffixes``."""
    return [n for n in spliced.adapter.hook_names() if n.endswith(tuple(suffixes))]


@torch.no_grad()
def shortfall(name: str, prompts: int, seed: int) -> dict[str, Any]:
    """One zoo model: per circuit semantics, budget and method, the kept set's faithfulness under
    each of :data:`FROZEN`, and the contrastive graph's prediction of it."""
    model = zoo.load(name).to(torch.float64)
    dictionaries = [d.to(torch.float64) for d in load_dictionaries(name)]
    batch = zoo.task(name).batch(model, prompts, split="test", seed=seed)
    assert batch.wrong is not None and batch.corrupted is not None
    metric = logit_diff_metric(batch.answers, batch.wrong)
    spliced = SplicedModel(model, dictionaries, batch.tokens)
    names = spliced.names
    with torch.enable_grad():
        graphs = graph_scores(
            spliced, batch.answers, batch.wrong, list(OURS.values()), batch.corrupted
        )
        corrupted = reference_acts(spliced, "corrupted", batch.corrupted)
        scores = method_scores(spliced, metric, graphs, corrupted, True)
    clean = {n: r.acts for n, r in spliced.clean.items()}
    candidates = flatten({n: clean[n] != corrupted[n] for n in names}, names)

    def patches(kept: Tensor, circuit: str) -> dict[str, Patch]:
        held = unflatten(kept, clean, names)
        if circuit == "live":  # kept latents recomputed by their encoders, the rest corrupted
            return {n: Patch(~held[n], corrupted[n]) for n in names}
        return {  # every latent held: the kept ones clean, the rest corrupted
            n: Patch(torch.ones_like(held[n]), torch.where(held[n], clean[n], corrupted[n]))
            for n in names
        }

    # every pattern and norm scale of the all-corrupted state, read off its run
    none_state = dict.fromkeys(frozen_hooks(spliced, FROZEN["both frozen"]), NOTHING)
    nothing = torch.zeros_like(candidates)  # every latent held at its corrupted activation
    m_none = float(metric(spliced.run(patches(nothing, "fixed"), read=none_state)).mean())
    budgets = budget_grid(int(candidates.sum(1).max()))
    out: dict[str, Any] = {"name": name, "budgets": list(budgets), "circuits": {}}
    for circuit, ours in OURS.items():
        estimate = flatten(scores[ours].estimate, names)
        kept_sets = {
            method: [top_n_mask(flatten(scores[method].key, names), candidates, n) for n in budgets]
            for method in (ours, *BASELINES)
        }
        result: dict[str, Any] = {"ours": ours, "gap": {}, "faithfulness": {}}
        for column, suffixes in FROZEN.items():
            held = {n: none_state[n] for n in frozen_hooks(spliced, suffixes)}

            def measured(
                kept: Tensor, held: dict[str, Tensor] = held, circuit: str = circuit
            ) -> float:
                logits = spliced.run(patches(kept, circuit), hold=held)
                return float(metric(logits).mean())

            gap = measured(candidates) - m_none
            result["gap"][column] = gap
            result["faithfulness"][column] = {
                method: [(measured(k) - m_none) / gap for k in sets]
                for method, sets in kept_sets.items()
            }
            if column == "real":  # the graph's own estimate of each method's kept set, and
                # its negative part (latents the graph says push against the answer)
                result["predicted"] = {
                    method: [float((estimate * k).sum(1).mean()) / gap for k in sets]
                    for method, sets in kept_sets.items()
                }
                result["negative"] = {
                    method: [float((estimate.clamp(max=0) * k).sum(1).mean()) / gap for k in sets]
                    for method, sets in kept_sets.items()
                }
        out["circuits"][circuit] = result
    return out


def _losses(result: dict[str, Any], column: str, ours: str, other: str) -> list[float]:
    f = result["faithfulness"][column]
    return [b - a for a, b in zip(f[ours], f[other])]


def markdown(results: Sequence[dict[str, Any]], command: str, seconds: float) -> str:
    """Per model and circuit semantics: every budget's four measurements of the DePass variant's
    and integrated gradients' sets, the graph's predictions, and a summary over the budgets
    where the graph's set loses."""
    other = "integrated gradients"
    lines = [
        "# Where the contrastive feature graph falls short, and why",
        "",
        f"`{command}`; {machine()}; {seconds:.0f} s in all.",
        "",
        "Faithfulness (`feature_faithfulness.md`: each method's top-n latents kept clean, every "
        "other latent at its corrupted activation, errors clean) measured four ways: the real "
        "spliced model; with every attention pattern held at its value in the all-corrupted "
        "state m(none); with every norm scale held there; with both held. Kept latents *fixed* "
        "(at their clean activations; ours: depass-contrast): with both held the metric is "
        "affine in the kept latents, so a set's faithfulness is the sum of its latents' own "
        "effects. Kept latents *live* (recomputed by their encoders; ours: "
        "depass-contrast-total): with both held, only the encoders stay nonlinear. Each column "
        "is normalised by its own m(all) - m(none). `predicted`: the graph's estimates of the "
        "set summed, over the real m(all) - m(none); `negative`: the part of that from latents "
        "it scores below 0. C = the DePass variant, IG = integrated gradients, AP = attribution "
        "patching.",
        "",
    ]
    for r in results:
        for circuit, c in r["circuits"].items():
            ours, f, p, neg = c["ours"], c["faithfulness"], c["predicted"], c["negative"]
            lines += [
                f"## `{r['name']}`, kept latents {circuit} (C = {ours})",
                "",
                "| latents | C real | IG real | AP real | C patterns frozen | IG patterns frozen "
                "| C norms frozen | IG norms frozen | C both frozen | IG both frozen | C predicted "
                "| IG predicted | C negative | IG negative |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for i, n in enumerate(r["budgets"]):
                cells = [f["real"][m][i] for m in (ours, other, "attribution patching")]
                for column in list(FROZEN)[1:]:
                    cells += [f[column][ours][i], f[column][other][i]]
                cells += [p[ours][i], p[other][i], neg[ours][i], neg[other][i]]
                lines.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
            lines.append("")
            gaps = ", ".join(f"{col} {g:.3f}" for col, g in c["gap"].items())
            lines.append(f"- m(all) - m(none): {gaps}.")
            lines += summary(r["budgets"], c, ours, other)
            lines.append("")
    return "\n".join(lines)


def summary(budgets: Sequence[int], c: dict[str, Any], ours: str, other: str) -> list[str]:
    """The budgets where ``ours``'s set is less faithful than ``other``'s (real model), and what
    the gap becomes with the nonlinear maps frozen."""
    real = _losses(c, "real", ours, other)
    losing = [i for i, d in enumerate(real) if d > TIE]
    if not losing:
        return [f"- {ours} at least as faithful as {other} at every budget."]
    out = [
        f"- {ours} below {other} at {len(losing)} of {len(real)} budgets "
        f"({', '.join(str(budgets[i]) for i in losing)} latents); mean shortfall there:"
    ]
    for column in FROZEN:
        d = _losses(c, column, ours, other)
        ahead = sum(d[i] <= TIE for i in losing)
        out.append(
            f"  - {column}: {mean_at(d, losing):+.3f} (C at least as faithful at {ahead} of "
            f"{len(losing)})"
        )
    p, neg = c["predicted"], c["negative"]
    rank = sum(p[ours][i] >= p[other][i] - TIE for i in losing)
    out.append(
        f"  - the graph predicts its own set at least as faithful at {rank} of {len(losing)} "
        f"(mean predicted {mean_at(p[ours], losing):.3f} against {mean_at(p[other], losing):.3f})"
    )
    out.append(
        f"  - the graph's negative estimates in the sets there: C "
        f"{mean_at(neg[ours], losing):.3f}, IG {mean_at(neg[other], losing):.3f}"
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
