"""The full faithfulness table: every zoo model, every level, every method.

    python -m depass_lens.evaluation.suite              # writes benchmarks/results/faithfulness*

Each (model, level) pair is one ``depass-lens eval`` run (JSON + HTML in the output folder); the
markdown table collects their areas and agreement numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from depass_lens import zoo
from depass_lens.evaluation.run import evaluate
from depass_lens.evaluation.task_batch import TaskBatch
from depass_lens.zoo.ablation import circuit_heads

PAIRS = [
    ("ioi", "heads"),
    ("ioi", "neurons"),
    ("ioi", "tokens"),
    ("induction", "heads"),
    ("induction", "tokens"),
    ("recall", "heads"),
    ("recall", "neurons"),
    ("bilingual", "subspace"),
]
N_PROMPTS = {"tokens": 24, "subspace": 48}


def run_pair(name: str, level: str, out: Path) -> tuple[str, float]:
    start = time.perf_counter()
    model = zoo.load(name)
    task = zoo.task(name)
    n = N_PROMPTS.get(level, 32)
    batch = TaskBatch.from_zoo(
        task.batch(model, n, split="test", seed=21), task.batch(model, n, split="train", seed=22)
    )
    truth = zoo.ground_truth(name)
    circuit = len(circuit_heads(truth)) if level == "heads" else None
    probe = zoo.info(name).get("probe") if level == "subspace" else None
    report = evaluate(
        model,
        batch,
        level,
        ground_truth=truth,
        circuit_size=circuit or None,
        probe=probe,
        name=name,
    )
    report.to_json(out / f"{name}_{level}.json")
    report.to_html(out / f"{name}_{level}.html")
    seconds = time.perf_counter() - start
    header = f"### `{name}`, {level} ({n} prompts; {seconds:.0f} s)\n\n"
    if level == "heads":
        header += f"Ground truth: mean-ablation; circuit size k = {circuit}.\n\n"
    return header + report.markdown(), seconds


#: The curve key each protocol is judged on, and whether lower areas are better.
PRIMARY = {"tokens": "prob", "subspace": "relative_change"}


def _judge(curve_name: str, level: str) -> tuple[str, bool]:
    key = PRIMARY.get(level, "metric_fraction")
    lower = curve_name.startswith(("top", "disrupt"))
    return key, lower


def winners(out: Path) -> str:
    """DePass (its best rule) against the best baseline, for every curve area of every pair."""
    lines = [
        "| model, level | curve (area) | DePass (taylor) | best DePass variant | best baseline "
        "| DePass best? |",
        "|---|---|---|---|---|---|",
    ]
    total = won = 0
    alone: dict[str, int] = {}  # curves where one DePass variant on its own beats every baseline
    for name, level in PAIRS:
        path = out / f"{name}_{level}.json"
        if not path.exists():
            continue
        methods = {
            m: r
            for m, r in json.loads(path.read_text())["methods"].items()
            if not r.get("skipped")
            and not m.startswith(("ablation", "activation-patching", "occlusion"))
        }
        curve_names = next(iter(methods.values()))["curves"]
        for curve_name in curve_names:
            key, lower = _judge(curve_name, level)
            areas = {m: r["curves"][curve_name]["areas"].get(key) for m, r in methods.items()}
            areas = {m: a for m, a in areas.items() if a is not None}
            pick = min if lower else max
            ours = {m: a for m, a in areas.items() if m.startswith("depass")}
            theirs = {m: a for m, a in areas.items() if not m.startswith("depass")}
            if not ours or not theirs:
                continue
            best_ours = pick(ours, key=lambda m: ours[m])
            best_theirs = pick(theirs, key=lambda m: theirs[m])
            ok = (
                ours[best_ours] <= theirs[best_theirs]
                if lower
                else (ours[best_ours] >= theirs[best_theirs])
            )
            total += 1
            won += ok
            for method, area in ours.items():
                best = theirs[best_theirs]
                alone[method] = alone.get(method, 0) + (area <= best if lower else area >= best)
            lines.append(
                f"| {name}, {level} | {curve_name} ({key}, {'lower' if lower else 'higher'} is "
                f"better) | {ours.get('depass-taylor', float('nan')):.3f} | {best_ours} "
                f"{ours[best_ours]:.3f} | {best_theirs} {theirs[best_theirs]:.3f} | "
                f"{'yes' if ok else '**no**'} |"
            )
    lines.append(f"\nDePass (its best variant) is best on {won} of {total} curve areas.")
    lines.append(
        "\nEach DePass variant on its own, curves where it is at least as good as every baseline:"
    )
    lines.append("")
    lines.append("| variant | curves |")
    lines.append("|---|---|")
    for method, count in sorted(alone.items(), key=lambda item: -item[1]):
        lines.append(f"| {method} | {count} of {total} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/faithfulness"))
    parser.add_argument("--only", default=None, help="a model name, to run its pairs only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, level in PAIRS:
        if args.only and name != args.only:
            continue
        text, _ = run_pair(name, level, args.out)
        (args.out / f"{name}_{level}.md").write_text(text)
        print(text, flush=True)
    sections = [
        (args.out / f"{name}_{level}.md").read_text()
        for name, level in PAIRS
        if (args.out / f"{name}_{level}.md").exists()
    ]
    (args.out / "tables.md").write_text("\n".join(sections))
    (args.out / "winners.md").write_text(winners(args.out))
    print(winners(args.out))


if __name__ == "__main__":
    main()
