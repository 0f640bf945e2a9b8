"""Per-call cost on a small model, where TransformerLens's own machinery (hooks, weight views)
rather than arithmetic sets the time: the zoo ``ioi`` model (3 layers, ``d_model`` 64), a batch
of 16 test prompts. Run it once per TransformerLens generation and compare::

    .venv/bin/python -m benchmarks.tl_overhead        # TransformerLens 3 (HookedTransformer)
    .venv-tl4/bin/python -m benchmarks.tl_overhead    # TransformerLens 4 (TransformerBridge)

Prints one JSON line per case: median seconds over the repeats (after one warm-up) and the
ratio to one ``run_with_cache`` measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import depass_lens as dp
from depass_lens.adapters.loading import tl_generation
from depass_lens.circuits import GraphNodes, build_spec
from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric

warnings.filterwarnings("ignore")


def cases(n_prompts: int) -> dict[str, Callable[[], object]]:
    model = dp.zoo.load("ioi")
    batch = dp.zoo.task("ioi").batch(model, n_prompts, "test", 0)
    tokens, corrupted = batch.tokens, batch.corrupted
    assert corrupted is not None
    target = dp.LogitDiff(batch.answers, batch.wrong)
    depass = dp.DePass(model, progress=False)
    spec = build_spec(depass.adapter, GraphNodes(), tokens.shape[1])
    metric = logit_diff_metric(batch.answers, batch.wrong)
    patcher = EdgePatcher(depass.adapter, spec, tokens, metric, corrupted=corrupted)
    everything = torch.ones(len(spec.edges), dtype=torch.bool)
    return {
        "run_with_cache": lambda: model.run_with_cache(tokens),
        "attribute heads (adjoint)": lambda: depass.attribute(tokens, target, dp.Heads()),
        "attribute tokens (forward)": lambda: depass.attribute(
            tokens, target, dp.Tokens(), mode="forward"
        ),
        "graph": lambda: depass.graph(tokens, target),
        "contrastive graph": lambda: depass.graph(tokens, target, contrast=corrupted),
        "edge patching, one circuit": lambda: patcher.logits(everything),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = None
    for name, fn in cases(args.prompts).items():
        fn()  # warm-up: first-call caches (weight views, finiteness scans) are not what is timed
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        base = base or seconds
        row = {"tl": tl_generation(), "case": name, "seconds": seconds, "ratio": seconds / base}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
