"""Cost of scoring every active latent of a large SAE in adjoint mode, as a ratio in one run.

    python -m benchmarks.sae_cost [--n-pos 128] [--d-sae 16384] [--device cpu]

A GPT-2-small-shaped random model (12 layers, d_model 768), a random TopK SAE (k = 64 active
latents per token) on ``blocks.6.hook_resid_post``, one logit-difference target. It times
``attribute`` with all heads, and with all heads plus every active latent (one
``Combined`` source: the same single backward), and writes the ratio to
``benchmarks/results/sae_cost.json``. The issue's bound: latents + heads <= 2x heads alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import depass_lens as dp
from depass_lens.sae import SimpleSAE
from depass_lens.sources import Combined

OUT = Path(__file__).parent / "results"


def random_topk_sae(
    d_model: int, d_sae: int, k: int, hook: str = "blocks.6.hook_resid_post", device: str = "cpu"
) -> SimpleSAE:
    """A random TopK SAE with unit decoder rows and a tied encoder (``k`` active per token)."""
    gen = torch.Generator().manual_seed(0)
    sae = SimpleSAE(d_model, d_sae, hook, "topk", k=k)
    with torch.no_grad():
        W = torch.randn(d_sae, d_model, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae.to(device)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-pos", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(OUT / "sae_cost.json"))
    args = parser.parse_args(argv)
    from benchmarks.cases import build  # noqa: PLC0415 - cases imports this module on use

    model = build("gpt2", args.device)  # the benchmark matrix's GPT-2-small-shaped model
    model.eval()
    sae = random_topk_sae(model.cfg.d_model, args.d_sae, args.k, device=args.device)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.n_pos), device=args.device)
    depass = dp.DePass(model, progress=False)
    target = dp.LogitDiff(11, 12)
    heads = dp.Heads()
    both = Combined([heads, dp.SAELatents(sae)])
    result = depass.attribute(tokens, target, both, mode="adjoint")
    n_latents = sum(lab.kind == "latent" for lab in result.labels)
    t_heads = _median_seconds(
        lambda: depass.attribute(tokens, target, heads, mode="adjoint"), args.repeats
    )
    t_both = _median_seconds(
        lambda: depass.attribute(tokens, target, both, mode="adjoint"), args.repeats
    )
    record = {
        "device": args.device,
        "n_pos": args.n_pos,
        "d_sae": args.d_sae,
        "k": args.k,
        "active_latents": n_latents,
        "seconds_heads": t_heads,
        "seconds_heads_and_latents": t_both,
        "ratio": t_both / t_heads,
        "completeness_error": result.completeness_error(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
