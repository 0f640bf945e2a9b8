"""Circuit faithfulness on every zoo model: DePass against EAP, EAP-IG and ACDC, one harness.

    python -m depass_lens.evaluation.circuit_suite        # writes benchmarks/results/circuits/

For each model: the task's held-out prompts and their corrupted counterparts (documented in each
zoo card), the logit difference answer - wrong as the metric, every method's edge scores on the
same graph (pooled embeddings, every head's query/key/value input, every MLP, the logits), and
each method's top-k circuits evaluated by edge patching at the same budgets. ACDC runs a
threshold sweep where the graph is small enough.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import depass_lens as dp
from depass_lens import zoo
from depass_lens.circuits import GraphNodes, build_spec
from depass_lens.circuits.extract import patchable
from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric
from depass_lens.evaluation.circuit_baselines import EAP_IG_STEPS, acdc, eap_graph
from depass_lens.evaluation.circuit_faithfulness import (
    CircuitCurve,
    acdc_curve,
    budget_grid,
    figure,
    graph_curve,
    timed,
    wins,
)

#: Zoo models with a logit-difference task, in the order of the tables.
MODELS = ["ioi", "induction", "recall"]
#: ACDC thresholds (fractions of the clean - corrupt gap), and the largest graph it runs on.
ACDC_THRESHOLDS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
ACDC_MAX_EDGES = 400


def models() -> list[str]:
    """The zoo models evaluated: the fixed list plus any multi-stage model the zoo ships."""
    extra = [name for name in zoo.list() if name not in MODELS and name != "bilingual"]
    return MODELS + extra


def run_model(name: str, n: int = 96, seed: int = 31, progress: bool = True) -> dict[str, Any]:
    """Every method's curve on ``name`` (``n`` held-out prompts)."""
    model = zoo.load(name)
    batch = zoo.task(name).batch(model, n, split="test", seed=seed)
    assert batch.wrong is not None and batch.corrupted is not None
    tokens, corrupted = batch.tokens, batch.corrupted
    target = dp.LogitDiff(batch.answers, batch.wrong, name="answer - wrong")
    depass = dp.DePass(model, progress=False)
    adapter = depass.adapter
    spec = build_spec(adapter, GraphNodes(), tokens.shape[1])
    metric = logit_diff_metric(batch.answers, batch.wrong)
    patcher = EdgePatcher(adapter, spec, tokens, metric, corrupted=corrupted)
    names = ["answer - wrong"]
    runs = {
        "depass-value": lambda: depass.graph(tokens, target, attention="value"),
        "depass-symmetric": lambda: depass.graph(tokens, target, attention="symmetric"),
        "depass-contrast": lambda: depass.graph(tokens, target, contrast=corrupted),
        "depass-contrast-clean": lambda: depass.graph(
            tokens, target, attention="symmetric", contrast=corrupted, linearisation="clean"
        ),
        "eap": lambda: eap_graph(adapter, spec, tokens, corrupted, [target], names),
        "eap-ig": lambda: eap_graph(
            adapter, spec, tokens, corrupted, [target], names, steps=EAP_IG_STEPS
        ),
    }
    n_edges = int(patchable(spec).sum())
    budgets = budget_grid(n_edges)
    curves: dict[str, CircuitCurve] = {}
    graphs = {}
    for method, run in runs.items():
        graph, seconds = timed(run)
        graphs[method] = graph
        curves[method] = graph_curve(patcher, graph, budgets, seconds, method, progress)
    if n_edges <= ACDC_MAX_EDGES:
        curves["acdc"] = acdc_curve(patcher, acdc(patcher, ACDC_THRESHOLDS, progress))
    return {
        "model": name,
        "prompts": n,
        "n_edges": n_edges,
        "clean": patcher.clean,
        "corrupt": patcher.corrupt,
        "curves": curves,
        "graphs": graphs,
        "conservation": {m: g.conservation() for m, g in graphs.items() if m.startswith("depass")},
    }


def summary(results: list[dict[str, Any]]) -> str:
    """Markdown: areas per method and model, and where DePass matches or beats EAP-IG."""
    methods = list(results[0]["curves"])
    lines = [
        "| model | edges | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in results:
        cells = []
        best = max(c.area for c in r["curves"].values())
        for m in methods:
            curve = r["curves"].get(m)
            if curve is None:
                cells.append("–")
                continue
            text = f"{curve.area:.3f}"
            cells.append(f"**{text}**" if curve.area == best else text)
        lines.append(f"| {r['model']} | {r['n_edges']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Area under normalised faithfulness against the kept fraction of edges (1 is perfect);",
        "the best per model in bold.",
        "",
        "Budgets where each DePass variant is at least as faithful as EAP-IG: strictly (within "
        "0.001) and within 0.01 of the normalised faithfulness (1% of the clean - corrupt gap).",
        "",
        "| model | DePass variant | strictly | within 0.01 | largest shortfall (at edges) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for m in [m for m in r["curves"] if m.startswith("depass")]:
            w = wins(r["curves"], m, "eap-ig")
            loose = wins(r["curves"], m, "eap-ig", tolerance=0.01)
            lines.append(
                f"| {r['model']} | {m} | {w['at_least_as_faithful']} of {w['budgets']} "
                f"({100 * w['share']:.0f}%) | {loose['at_least_as_faithful']} of {w['budgets']} "
                f"({100 * loose['share']:.0f}%) | {max(w['worst_gap'], 0.0):.3f} "
                f"({w['worst_gap_budget']}) |"
            )
    lines += ["", "| model | method | seconds to score all edges |", "|---|---|---|"]
    for r in results:
        for m, c in r["curves"].items():
            lines.append(f"| {r['model']} | {m} | {c.seconds:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/circuits"))
    parser.add_argument("--only", default=None, help="one zoo model")
    parser.add_argument("-n", type=int, default=96, help="held-out prompts per model")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in models():
        if args.only and name != args.only:
            continue
        start = time.perf_counter()
        result = run_model(name, args.n)
        result["seconds"] = time.perf_counter() - start
        results.append(result)
        payload = {k: v for k, v in result.items() if k not in ("curves", "graphs")}
        payload["curves"] = {m: c.to_dict() for m, c in result["curves"].items()}
        (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
        print(f"{name}: {result['seconds']:.0f} s", flush=True)
    text = summary(results)
    (args.out / "summary.md").write_text(text)
    fig = figure({r["model"]: r["curves"] for r in results})
    fig.write_html(args.out / "faithfulness.html", include_plotlyjs="cdn")
    print(text)


if __name__ == "__main__":
    main()
