"""The full faithfulness table: every zoo model, every level, every method.

    python -m depass_lens.evaluation.suite              # writes benchmarks/results/faithfulness*

Each (model, level) pair is one ``depass-lens eval`` run (JSON + HTML in the output folder); the
markdown table collects their areas and agreement numbers.
"""

from __future__ import annotations

import argparse
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


if __name__ == "__main__":
    main()
