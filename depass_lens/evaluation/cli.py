"""``depass-lens eval --model ioi --level heads``: evaluate on a zoo model, write JSON + HTML."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from depass_lens import zoo
from depass_lens.errors import DePassInputError
from depass_lens.evaluation.run import evaluate
from depass_lens.evaluation.task_batch import TaskBatch
from depass_lens.zoo.ablation import circuit_heads


def run_cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    probe = zoo.info(args.model).get("probe") if args.level == "subspace" else None
    if args.level == "subspace" and probe is None:
        have = [name for name in zoo.list() if zoo.info(name).get("probe") is not None]
        raise DePassInputError(
            f"--level subspace needs a zoo model with a probe ({', '.join(have)}), "
            f"not {args.model!r}"
        )
    model = zoo.load(args.model, device=args.device)
    task = zoo.task(args.model)
    batch = TaskBatch.from_zoo(
        task.batch(model, args.n, split="test", seed=21),
        task.batch(model, args.n, split="train", seed=22),
    )
    truth = zoo.ground_truth(args.model) if args.level in ("heads", "neurons") else None
    circuit = len(circuit_heads(truth)) if truth is not None and args.level == "heads" else 0
    report = evaluate(
        model,
        batch,
        args.level,
        ground_truth=truth,
        agreement_ks=[circuit] if circuit else None,
        probe=probe,
        name=args.model,
    )
    out = Path(args.out)
    stem = f"{args.model}_{args.level}"
    json_path = report.to_json(out / f"{stem}.json")
    html_path = report.to_html(out / f"{stem}.html")
    print(report.markdown())
    print(f"wrote {json_path} and {html_path} in {time.perf_counter() - start:.1f} s")
    return 0
