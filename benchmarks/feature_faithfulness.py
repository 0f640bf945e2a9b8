"""Feature-level faithfulness by intervention (issue 18.4): DePass feature graphs against
circuit-tracer's frozen-attention graph, attribution patching and integrated gradients on
latents, on every zoo model that ships dictionaries, with the dictionaries spliced in.

    python -m benchmarks.feature_faithfulness [--prompts 32] [--only ioi] [--no-single-latent]

Writes ``benchmarks/results/feature_faithfulness.md`` and ``.json`` (one entry per model, written
as each finishes); ``docs/make_figures.py --only feature_faithfulness`` plots the curves from the
JSON. Everything runs in float64 (float32 contrastive graphs pass their exactness check too, at
most 2.8e-7 relative on the zoo models; float64 keeps the comparison free of rounding), and the
harness refuses an inexact graph. The second part re-runs issue 11's single-latent table
(:mod:`benchmarks.sae_faithfulness`, float32 as there) with the feature graph's rows added.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import machine
from depass_lens import zoo
from depass_lens.evaluation.feature_faithfulness import (
    BASELINES,
    FeatureFaithfulness,
    ablation_table,
    area_table,
    evaluate,
    single_latent_table,
    win_lines,
    win_table,
)
from depass_lens.evaluation.sae_faithfulness import FaithfulnessResult, removal_table, table
from depass_lens.zoo.saes import dictionary_keys, load_dictionaries, load_sae

OUT = Path(__file__).parent / "results"


def rounded(value: Any) -> Any:
    """Floats to 6 significant digits, recursively (the JSON stays small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(rounded(payload), separators=(",", ":")) + "\n")


def models() -> list[str]:
    """Zoo models that ship the dictionaries of a replacement model."""
    return [name for name in zoo.list() if dictionary_keys(name)]


def run_model(name: str, prompts: int, seed: int, progress: bool) -> FeatureFaithfulness:
    model = zoo.load(name).to(torch.float64)
    dictionaries = [d.to(torch.float64) for d in load_dictionaries(name)]
    batch = zoo.task(name).batch(model, prompts, split="test", seed=seed)
    assert batch.wrong is not None and batch.corrupted is not None
    return evaluate(
        model,
        dictionaries,
        batch.tokens,
        batch.corrupted,
        batch.answers,
        batch.wrong,
        name=name,
        progress=progress,
    )


def best_line(r: FeatureFaithfulness, circuit: str) -> str:
    cs = r.curves[circuit]
    areas = {m: cs.area(m) for m in cs.curves}
    ours = max((m for m in areas if m.startswith("depass")), key=areas.__getitem__)
    theirs = max((m for m in areas if m in BASELINES), key=areas.__getitem__)
    return (
        f"`{r.name}`: best DePass variant {ours} {areas[ours]:.3f}, best baseline {theirs} "
        f"{areas[theirs]:.3f}"
    )


def _share(r: FeatureFaithfulness, circuit: str, method: str, tolerance: float) -> str:
    w = win_table(r.curves[circuit], tolerance=tolerance)[method]
    return f"{100 * w['share']:.0f}%"


def reading(results: list[FeatureFaithfulness], single: Any) -> list[str]:
    """The numbers the conclusions rest on, computed from this run."""
    lines = ["## Reading", ""]
    for circuit, ours in (("fixed", "depass-contrast"), ("live", "depass-contrast-total")):
        parts = []
        for r in results:
            areas = {m: r.curves[circuit].area(m) for m in r.curves[circuit].curves}
            best = max((m for m in areas if m in BASELINES), key=areas.__getitem__)
            gap = win_table(r.curves[circuit])[ours]
            parts.append(
                f"`{r.name}` {areas[ours]:.3f} vs {best} {areas[best]:.3f}, at least as "
                f"faithful as every baseline at {_share(r, circuit, ours, 1e-3)} of budgets "
                f"({_share(r, circuit, ours, 0.01)} within 0.01; largest shortfall "
                f"{max(gap['worst_gap'], 0.0):.3f} at {gap['worst_gap_budget']} latents)"
            )
        lines.append(f"- Kept latents {circuit}, {ours}: " + "; ".join(parts) + ".")
    parts = []
    for r in results:
        cs = r.curves["fixed"]
        curve = cs.curves["depass-contrast"]
        i = min(range(len(curve.budgets)), key=lambda j: abs(curve.budgets[j] - 10))
        if cs.predicted:
            parts.append(
                f"`{r.name}` {curve.faithfulness[i]:.2f} measured against "
                f"{cs.predicted['depass-contrast'][i]:.2f} predicted at {curve.budgets[i]} latents"
            )
    if parts:
        lines.append(
            "- Kept latents fixed, the contrastive graph's own prediction of its faithfulness "
            "(its kept latents' shares summed, over m(all) - m(none)): " + "; ".join(parts) + "."
            " Where its top latents fall behind a baseline's, what causes it is measured by "
            "`python -m benchmarks.feature_shortfall` (`feature_shortfall.md`: the same sets with "
            "the model's patterns and norm scales held)."
        )
    for ref in ("zero", "corrupted"):
        parts = []
        for r in results:
            stats = {m: [p.stats() for p in pts] for m, pts in r.ablation[ref].items()}
            mean_r = {m: sum(x["pearson"] for x in st) / len(st) for m, st in stats.items()}
            top = max(mean_r, key=mean_r.__getitem__)
            last = {m: st[-1]["relative_error"] for m, st in stats.items()}
            low = min(last, key=last.__getitem__)
            parts.append(
                f"`{r.name}` highest mean r {top} {mean_r[top]:.2f}, smallest error at "
                f"n={stats[top][-1]['n']} {low} {last[low]:.2f}"
            )
        lines.append(f"- (a), reference {ref}: " + "; ".join(parts) + ".")
    if single is not None:
        rows = single.rows
        graph = rows["feature graph (symmetric)"]
        lines.append(
            "- Single latents (`ioi` residual SAE): attribution patching's signed Spearman "
            f"{rows['attribution patching']['spearman']:.3f} against the feature graph's "
            f"{graph['spearman']:.3f} (DePass's: "
            f"{rows['DePass (symmetric)']['spearman']:.3f}); top-10 removed at once: feature graph "
            f"{single.removal['feature graph (symmetric)'][10]:.3f} of the clean metric, "
            f"attribution patching {single.removal['attribution patching'][10]:.3f}, the "
            f"single-latent oracle {single.removal['single-latent ablation (oracle)'][10]:.3f}."
        )
    return lines + [""]


def markdown(
    results: list[FeatureFaithfulness], single: Any, args: argparse.Namespace, seconds: float
) -> str:
    r0 = results[0]
    lines = [
        "# Feature faithfulness by intervention",
        "",
        f"`python -m benchmarks.feature_faithfulness --prompts {args.prompts} --seed "
        f"{args.seed}`; {machine()} {seconds:.0f} s in all.",
        "",
        f"Zoo models with their shipped dictionaries spliced in ({args.prompts} held-out prompts "
        f"each, test split, seed {args.seed}; float64). Metric: logit(answer) - logit(wrong) at "
        "the last position; corrupted prompts: each task's documented corruption. One feature "
        "graph per prompt and method. Integrated gradients: "
        f"{r0.meta['ig_steps']} midpoints per site (Sparse Feature Circuits' recipe: one site's "
        "latents on the path, the other sites live).",
        "",
        "Harness: every dictionary's module output is its latents' reconstruction (latents "
        "computed live by their encoders) plus the error frozen at its clean value, which "
        "reproduces the model exactly.",
        "",
        "## (b) Contrastive faithfulness curves",
        "",
        "Per prompt, each method's top-n latents (by |score|, among the latents whose activation "
        "differs between the clean and the corrupted prompt) are kept; every other latent is "
        "held at its corrupted activation; errors stay frozen at their clean values; the input "
        "is the clean prompt. Faithfulness = (m(circuit) - m(none)) / (m(all) - m(none)) of "
        "batch means, where m(all) is the clean model (exactly) and m(none) has every latent "
        "corrupted. Two semantics for the kept latents: **fixed** (held at their clean "
        "activations: the literal protocol; a latent then acts only through paths that avoid "
        "every other latent, which is what a graph's direct share measures) and **live** "
        "(recomputed by their encoders from the patched stream, Sparse Feature Circuits' "
        "semantics: kept latents also carry their effects through later kept latents).",
        "",
        "Scores, each an estimate of the metric's change when a latent moves from its corrupted "
        "to its clean activation: DePass clean graphs (value, symmetric) scale the latent's "
        "share by (a - a_corrupt) / a; the contrastive graph's share is that change's share "
        "already; `-total` variants add what the latent sends through every later latent "
        "(signed flow of the graph's exact edges); circuit-tracer ranks by its influence on the "
        "frozen-attention graph with position 0 left out. Budgets: a geometric grid from 1 "
        "latent to the largest candidate count; area under faithfulness against log(n) / "
        "log(N) (best per model in bold).",
        "",
    ]
    for circuit in ("fixed", "live"):
        lines += [f"### Areas, kept latents {circuit}", "", area_table(results, circuit), ""]
        lines += [
            f"Budgets where each DePass variant is at least as faithful as every baseline "
            f"(attribution patching, integrated gradients, circuit-tracer), kept latents "
            f"{circuit}:",
            "",
            win_lines(results, circuit),
            "",
        ]
        lines += [f"- {best_line(r, circuit)}" for r in results] + [""]
    lines += ["Endpoints (batch means of the metric):", ""]
    lines += ["| model | clean | corrupted | m(all) | m(none) |", "|---|---|---|---|---|"]
    for r in results:
        e = r.curves["fixed"].endpoints
        lines.append(
            f"| {r.name} | {e['clean']:.3f} | {e['corrupt']:.3f} | {e['all']:.3f} | "
            f"{e['none']:.3f} |"
        )
    lines += [""] + reading(results, single)
    lines += [
        "## (a) Ablating each method's top-n latents",
        "",
        "Per prompt, the top-n latents by |score| are set to the reference (zero; or the "
        "corrupted prompt's activation, where the contrastive graph joins) all at once in the "
        "spliced model, the other latents live, errors frozen. Prediction: minus the sum of the "
        "ablated latents' estimates. Cells: Pearson r across prompts between predicted and "
        "measured change / mean |error| relative to the mean |measured change|.",
        "",
    ]
    for r in results:
        for ref in r.ablation:
            lines += [f"### `{r.name}`, reference {ref}", "", ablation_table(r, ref), ""]
    lines += [
        "## Seconds to score every latent of every prompt",
        "",
        "Graph methods of one setting (value and value-total, symmetric and symmetric-total, "
        "contrast and contrast-total) share one full graph per prompt, whose seconds both show. "
        "The gradient methods run on the whole batch at once.",
        "",
    ]
    methods = list(dict.fromkeys(m for r in results for m in r.seconds))
    lines += ["| model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for r in results:
        cells = [f"{r.seconds[m]:.1f}" if m in r.seconds else "–" for m in methods]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    if single is not None:
        lines += [
            "",
            "## Issue 11's single-latent table, with the feature graph",
            "",
            f"`ioi`'s residual SAE (`{single.meta['hook']}`), {single.n_prompts} prompts "
            f"(seed {args.single_seed}), float32; ground truth: each active latent zero-ablated "
            "alone, exactly (SAE spliced, error kept). Feature graph rows: the latent's share "
            "(summed over positions; one graph per prompt), and its total share with the layer-2 "
            "MLP's transcoder as a second dictionary (so the MLP's response follows its latents).",
            "",
            table(single),
            "",
            removal_table(single),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--only", nargs="+", default=None, help="zoo models")
    parser.add_argument("--no-single-latent", action="store_true")
    parser.add_argument("--single-prompts", type=int, default=64)
    parser.add_argument("--single-seed", type=int, default=11)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the existing .json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown_only:
        payload = json.loads((out / "feature_faithfulness.json").read_text())
        loaded = [FeatureFaithfulness.from_dict(r) for r in payload["models"].values()]
        single = payload.get("single_latent")
        if single is not None:
            single["removal"] = {
                k: {int(n): v for n, v in by.items()} for k, by in single["removal"].items()
            }
            single["ks"] = tuple(single["ks"])
            single = FaithfulnessResult(**single)
        text = markdown(loaded, single, args, payload.get("seconds", float("nan")))
        (out / "feature_faithfulness.md").write_text(text)
        print(text)
        return
    start = time.perf_counter()
    results: list[FeatureFaithfulness] = []
    payload: dict[str, Any] = {"models": {}}
    for name in args.only or models():
        t = time.perf_counter()
        results.append(run_model(name, args.prompts, args.seed, args.progress))
        payload["models"][name] = results[-1].to_dict()
        write_json(out / "feature_faithfulness.json", payload)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    single = None
    if not args.no_single_latent:
        t = time.perf_counter()
        model = zoo.load("ioi")
        batch = zoo.task("ioi").batch(model, args.single_prompts, "test", args.single_seed)
        assert batch.wrong is not None
        single = single_latent_table(
            model,
            load_sae("ioi"),
            batch.tokens,
            batch.answers,
            batch.wrong,
            transcoders=load_dictionaries("ioi"),
        )
        payload["single_latent"] = asdict(single)
        write_json(out / "feature_faithfulness.json", payload)
        print(f"single-latent table: {time.perf_counter() - t:.0f} s", flush=True)
    payload["seconds"] = time.perf_counter() - start
    write_json(out / "feature_faithfulness.json", payload)
    text = markdown(results, single, args, payload["seconds"])
    (out / "feature_faithfulness.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
