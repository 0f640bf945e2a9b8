"""Scale: seconds and peak memory of DePass on billion-parameter shapes at long prompts.

Random LLaMA-shaped models (RMSNorm, rotary, grouped-query attention, gated SiLU MLPs) of a 1B
and a 7B shape, a GPT-2-small shape, one prompt of random tokens, and per (model, length, case)
one subprocess so that its peak memory is its own::

    python -m benchmarks.scale --device cuda --dtype bfloat16 --n-pos 2048   # on one GPU
    python -m benchmarks.scale --shapes gpt2-small --dtype float32 --device cpu \
        --n-pos 256 512 1024 2048                                             # memory vs length
    python -m benchmarks.scale --cpu-smoke                                    # tiny, on the CPU

Cases: one ``run_with_cache`` (the ratios' base, called as TransformerLens's docs do, so autograd
keeps what a backward pass would need), and one under ``torch.no_grad()``; every head to one logit
difference (adjoint mode); the circuit graph (every edge, symmetric split); the contrastive graph
(difference linearisation). Each is timed under a time limit after a warm-up call on 16 tokens
(one-time setup is not the case's cost): once by default (at billion-parameter sizes one call is
the realistic use), or the fastest of ``--repeat`` calls (single calls of a few seconds vary by up
to 1.6x between runs on a shared CPU); a case that runs out of memory or time is reported as such.
Peak memory is the whole process's during the timed calls (the model included, building it not):
the CUDA allocator's peak on a GPU, the resident set's (``VmHWM``, reset before the first call) on
the CPU.
Results: JSON lines on stdout and in ``benchmarks/results/scale[_cuda].jsonl`` (beside ``--out``),
a markdown table in ``benchmarks/results/scale[_cuda].md``; ``docs/make_figures.py --only scale``
plots peak memory against length from the GPT-2-small rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.cases import peak_rss_bytes, reset_peak_rss
from benchmarks.run import machine

RESULTS = Path(__file__).parent / "results"
LLAMA = dict(
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    final_rms=True,
)
GPT2 = dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")
#: name -> TransformerLens 3 config fields (``rotary_dim`` is ``d_head``).
SHAPES = {
    # Llama-3.2-1B: 16 layers, d_model 2048, 32 heads in 8 key/value groups, d_mlp 8192.
    "llama-1b": dict(
        n_layers=16, d_model=2048, n_heads=32, d_head=64, d_mlp=8192, n_key_value_heads=8,
        d_vocab=128256,
    ),
    # Llama-2-7B: 32 layers, d_model 4096, 32 heads (no grouping), d_mlp 11008.
    "llama-7b": dict(
        n_layers=32, d_model=4096, n_heads=32, d_head=128, d_mlp=11008, n_key_value_heads=32,
        d_vocab=32000,
    ),
    # GPT-2 small: 12 layers, d_model 768, 12 heads, d_mlp 3072, learned positions.
    "gpt2-small": dict(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
    ),
    # --cpu-smoke: the same code paths in seconds.
    "smoke": dict(
        n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=256, n_key_value_heads=2,
        d_vocab=1000,
    ),
}  # fmt: skip
CASES = ("run_with_cache", "heads", "graph", "contrastive graph", "run_with_cache, no grad")


def build(shape: str, n_pos: int, dtype: torch.dtype, device: str):
    """The random model, created directly on ``device`` in ``dtype`` (a 7B model is never
    materialised in float32 or on the CPU first)."""
    from depass_lens.adapters.loading import random_model

    shaped = SHAPES[shape]
    family = LLAMA if "n_key_value_heads" in shaped else GPT2
    config = {**family, **shaped, "seed": 0}
    if family is LLAMA:
        config["rotary_dim"] = shaped["d_head"]
    config["n_ctx"] = max(n_pos, 128)
    with torch.device(device):
        return random_model(config, device, dtype=dtype)


def run_case(
    shape: str, case: str, n_pos: int, dtype: torch.dtype, device: str, repeat: int = 1
) -> dict:
    """One case in this process: seconds of the fastest of ``repeat`` calls and the peak memory
    over all of them (model included)."""
    import depass_lens as dp

    warnings.filterwarnings("ignore")
    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    model = build(shape, n_pos, dtype, device)
    built = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(0, vocab, (1, n_pos), generator=gen).to(device)
    target = dp.LogitDiff(1, 2)
    depass = dp.DePass(model, progress=False)

    def call(tokens: torch.Tensor) -> None:
        if case == "run_with_cache":  # as TransformerLens's docs call it: autograd on
            model.run_with_cache(tokens)
        elif case == "run_with_cache, no grad":  # the forward's own peak, without autograd
            with torch.no_grad():
                model.run_with_cache(tokens)
        elif case == "heads":
            depass.attribute(tokens, target, dp.Heads(), mode="adjoint")
        elif case == "graph":
            depass.graph(tokens, target)
        else:
            depass.graph(tokens, target, contrast=torch.roll(tokens, 1, dims=1))

    call(tokens[:, :16])  # warm-up on a short prompt: one-time setup is not the case's cost
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call(tokens)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {
        "shape": shape,
        "case": case,
        "n_pos": n_pos,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "seconds": min(times),
        "all_seconds": times,
        "build_seconds": built,
        "peak_bytes": peak,
        "model_bytes": model_bytes,
    }


def spawn(
    shape: str, case: str, n_pos: int, dtype: str, device: str, timeout: float, repeat: int = 1
) -> dict:
    """:func:`run_case` in a fresh subprocess under ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--worker", shape, case]
    cmd += ["--n-pos", str(n_pos), "--dtype", dtype, "--device", device, "--repeat", str(repeat)]
    row = {"shape": shape, "case": case, "n_pos": n_pos, "dtype": dtype, "device": device}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"over the {timeout:.0f} s limit"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
    killed = out.returncode in (-9, 137)
    oom = killed or "out of memory" in out.stderr.lower()
    return {**row, "error": "out of memory" if oom else tail[0][:200]}


def markdown(rows: list[dict]) -> str:
    """One row per case; seconds and peak memory also as ratios to ``run_with_cache``'s."""
    lines = [
        "| model | dtype | tokens | case | seconds | x run_with_cache | peak GiB "
        "| peak x run_with_cache | model GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {
        (r["shape"], r["n_pos"]): r
        for r in rows
        if r["case"] == "run_with_cache" and "seconds" in r
    }
    for r in rows:
        head = f"| {r['shape']} | {r['dtype']} | {r['n_pos']} | {r['case']} |"
        if "seconds" not in r:
            lines.append(f"{head} {r['error']} | | | | |")
            continue
        ref = base.get((r["shape"], r["n_pos"]))
        speed = f"{r['seconds'] / ref['seconds']:.1f}x" if ref else ""
        memory = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else ""
        lines.append(
            f"{head} {r['seconds']:.2f} | {speed} | {r['peak_bytes'] / 2**30:.2f} | {memory} | "
            f"{r['model_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-7b"])
    parser.add_argument("--n-pos", type=int, nargs="+", default=[2048])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per case")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 128 tokens, CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="timed calls per case; the fastest is reported"
    )
    args = parser.parse_args()
    if args.worker:
        shape, case = args.worker
        dtype = getattr(torch, args.dtype)
        n_pos = args.n_pos[0]
        row = run_case(shape, case, n_pos, dtype, args.device, args.repeat)
        print(json.dumps(row), flush=True)
        return
    if args.cpu_smoke:
        args.shapes, args.n_pos, args.device = ["smoke"], [128], "cpu"
    rows = []
    for shape in args.shapes:
        for n_pos in args.n_pos:
            for case in args.cases:
                row = spawn(shape, case, n_pos, args.dtype, args.device, args.timeout, args.repeat)
                print(json.dumps(row), flush=True)
                rows.append(row)
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    out = args.out or RESULTS / f"scale{suffix}.md"
    command = "python -m benchmarks.scale " + " ".join(sys.argv[1:])
    out.write_text(f"`{command}`\n\n{machine()}\n\n{markdown(rows)}")
    out.with_suffix(".jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
