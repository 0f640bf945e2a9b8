"""bfloat16 and float16 against float32: how far DePass's scores on a half-precision model are
from the same model's in float32, and how close its components sum to the half model's own
activations. Numbers for ``docs/limitations.md`` (section "Half precision") and issue 17.

Each half model is the float32 model cast (``model.to(dtype)``), so the two differ only by the
half model's rounding. Every gap is ``max |half - fp32| / max |fp32|`` over one kind of score,
also given in units of the dtype's ``eps`` (bf16 ``2^-8``, fp16 ``2^-11``)::

    python -m benchmarks.half_precision [--n-pos 64] [--out benchmarks/results/half_precision.md]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections.abc import Callable

import torch

import depass_lens as dp
from benchmarks.cases import CONFIGS, build
from depass_lens.adapters.base import TLModel
from depass_lens.adapters.loading import tl_generation
from depass_lens.decomposition import tolerance

warnings.filterwarnings("ignore")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = dp.LogitDiff(1234, 4321)


def gap(half: torch.Tensor, full: torch.Tensor) -> float:
    half, full = half.detach().double(), full.detach().double()
    return float((half - full).abs().max() / full.abs().max())


def measures(model: TLModel, tokens: torch.Tensor, corrupt: torch.Tensor) -> dict[str, Callable]:
    """Each measured quantity as a function of a model (fp32 or half) returning a tensor."""
    target = TARGET if model.cfg.d_vocab > 4321 else dp.LogitDiff(1, 2)

    def heads_adjoint(m: TLModel) -> torch.Tensor:
        return dp.DePass(m, progress=False).attribute(tokens, target, dp.Heads()).scores

    def tokens_forward(m: TLModel) -> torch.Tensor:
        depass = dp.DePass(m, progress=False)
        return depass.attribute(tokens, target, dp.Tokens(), mode="forward").scores

    def graph(m: TLModel) -> torch.Tensor:
        return dp.DePass(m, progress=False).graph(tokens, target).edge_scores

    def contrastive(m: TLModel) -> torch.Tensor:
        return dp.DePass(m, progress=False).graph(tokens, target, contrast=corrupt).edge_scores

    return {
        "heads, adjoint (symmetric split)": heads_adjoint,
        "tokens, forward mode": tokens_forward,
        "graph edges": graph,
        "contrastive graph edges": contrastive,
    }


def lossless(model: TLModel, tokens: torch.Tensor) -> float:
    """Worst relative error, over every hook, of the components' sum against the model's own
    activations (``run()``'s ``check_lossless``)."""
    _, cache = model.run_with_cache(tokens)
    result = dp.DePass(model, progress=False).run(tokens, cache=cache, names_filter=lambda n: True)
    return max(result.check_lossless(cache).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-pos", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/half_precision.md")
    args = parser.parse_args()
    rows = []
    for name in ("ioi", *CONFIGS):

        def make(name: str = name) -> TLModel:  # the same seeded weights each time
            return dp.zoo.load(name) if name == "ioi" else build(name)

        full = make()
        vocab = min(full.cfg.d_vocab, 1000)
        gen = torch.Generator().manual_seed(0)
        n_pos = min(args.n_pos, full.cfg.n_ctx)
        tokens = torch.randint(1, vocab, (2, n_pos), generator=gen)
        corrupt = torch.randint(1, vocab, (2, n_pos), generator=gen)
        fns = measures(full, tokens, corrupt)
        reference = {what: fn(full) for what, fn in fns.items()}
        for label, dtype in HALF.items():
            half = make().to(dtype)  # .to casts in place: a fresh copy per dtype
            eps = torch.finfo(dtype).eps
            start = time.perf_counter()
            for what, fn in fns.items():
                g = gap(fn(half), reference[what])
                rows.append((name, label, what, g, g / eps))
            err = lossless(half, tokens)
            rows.append((name, label, "losslessness vs the half model", err, err / eps))
            print(f"{name} {label}: {time.perf_counter() - start:.1f} s", flush=True)
    lines = [
        "# Half precision against float32",
        "",
        f"`python -m benchmarks.half_precision --n-pos {args.n_pos}`; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"TransformerLens {tl_generation()}.x; "
        "2 prompts of random tokens. Gap: `max |half - fp32| / max |fp32|` (last column in the "
        f"dtype's eps: bf16 {torch.finfo(torch.bfloat16).eps:.3g}, fp16 "
        f"{torch.finfo(torch.float16).eps:.3g}). Tolerance DePass applies: bf16 "
        f"{tolerance(torch.bfloat16):.3g}, fp16 {tolerance(torch.float16):.3g}.",
        "",
        "| model | dtype | quantity | gap | in eps |",
        "|---|---|---|---|---|",
        *(f"| {m} | {d} | {w} | {g:.2e} | {e:.2f} |" for m, d, w, g, e in rows),
        "",
    ]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
