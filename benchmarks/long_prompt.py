"""Token-level forward-mode DePass on one long prompt: does it finish, and in how much memory?

    python -m benchmarks.long_prompt --n-pos 1024        # GPT-2-small-sized random model

Prints wall time, peak resident memory, the chunk size forward mode chose from its memory budget,
and the completeness check (the token scores plus bias equal the real logit).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import depass_lens as dp
from benchmarks.cases import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--n-pos", type=int, default=1024)
    args = parser.parse_args()
    model = build(args.config)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.n_pos), generator=gen)
    depass = dp.DePass(model)
    chunk = depass._chunk(depass.prepare(tokens), args.n_pos + 1)
    start = time.perf_counter()
    attribution = depass.attribute(tokens, dp.Logit(1234), dp.Tokens(), mode="forward")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logit = float(model(tokens)[0, -1, 1234])
    total = float(attribution.scores.sum())
    print(
        json.dumps(
            {
                "config": args.config,
                "n_pos": args.n_pos,
                "components": args.n_pos + 1,
                "seconds": seconds,
                "chunk_size": chunk,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "logit": logit,
                "sum_of_scores": total,
                "relative_gap": abs(total - logit) / abs(logit),
            }
        )
    )


if __name__ == "__main__":
    main()
