"""Token-level forward-mode DePass on one long prompt: does it finish, and in how much memory?

    python -m benchmarks.long_prompt --n-pos 1024                       # CPU, GPT-2-small-sized
    python -m benchmarks.long_prompt --device cuda --memory-budget-gib 8

Prints wall time, peak memory (resident memory on the CPU, the allocator's peak on CUDA), the chunk
size forward mode chose from its memory budget, and the completeness check (the token scores plus
bias equal the real logit).
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--memory-budget-gib", type=float, default=None, help="default: DePass's own choice"
    )
    args = parser.parse_args()
    model = build(args.config, args.device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.n_pos), generator=gen).to(args.device)
    budget = None if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30)
    depass = dp.DePass(model, memory_budget=budget, attention="value")
    chunk = depass._chunk(depass.prepare(tokens), args.n_pos + 1)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    attribution = depass.attribute(tokens, dp.Logit(1234), dp.Tokens(), mode="forward")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logit = float(model(tokens)[0, -1, 1234])
    total = float(attribution.scores.sum())
    peak = (
        {"peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
        if cuda
        else {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    )
    print(
        json.dumps(
            {
                "config": args.config,
                "device": args.device,
                "n_pos": args.n_pos,
                "components": args.n_pos + 1,
                "seconds": seconds,
                "chunk_size": chunk,
                "memory_budget_gib": args.memory_budget_gib,
                **peak,
                "logit": logit,
                "sum_of_scores": total,
                "relative_gap": abs(total - logit) / abs(logit),
            }
        )
    )


if __name__ == "__main__":
    main()
