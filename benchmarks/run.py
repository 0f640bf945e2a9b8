"""Speed and memory of DePass against a plain forward pass and the alternatives, in one run.

    python -m benchmarks.run            # full matrix (about 15 minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # 128 tokens only, one repeat
    python -m benchmarks.run --device cuda   # on a GPU: results/cuda/
    python -m benchmarks.run --only feature --threads 1   # feature graphs: results/only-feature/
    .venv-tl4/bin/python -m benchmarks.run   # TransformerLens 4 (TransformerBridge): results/tl4/

On the CPU every case runs in its own subprocess (see ``benchmarks/cases.py``), so its peak memory
is its own; on CUDA the cases share one process and each reads the allocator's peak. Ratios compare
cases measured in this same run. Results go to ``benchmarks/results/`` (``results/cuda/`` for
``--device cuda``): the raw JSON, a markdown table and a plotly chart of cost against prompt
length. ``--only WORD`` runs the cases whose config or case name contains WORD, with the cases
their ratios divide by, and writes to ``results/only-WORD/`` (the docs' tables are left alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import plotly.graph_objects as go
from tqdm import tqdm

from depass_lens.adapters.loading import tl_generation

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"
DOCS_START, DOCS_END = "<!-- results: written by python -m benchmarks.run -->", "<!-- /results -->"
#: The same block for TransformerLens 4's run (``.venv-tl4/bin/python -m benchmarks.run``).
DOCS_TL4 = (
    "<!-- results tl4: written by .venv-tl4/bin/python -m benchmarks.run -->",
    "<!-- /results tl4 -->",
)

#: (config, case, n_pos, repeats, warm-up?) -- issue 4's matrix, (a) to (d), and circuits (e).
FULL = (
    [
        (c, case, n, 3, True)
        for c in ("gpt2", "llama")
        for n in (128, 512, 1024)
        for case in ("forward", "adjoint_all", "adjoint_all_qk", "atp")
    ]
    + [
        (c, case, 128, 1, True)
        for c in ("gpt2", "llama")
        for case in ("forward_mode_tokens", "forward_mode_tokens_qk", "plain_forwards_n")
    ]
    + [
        ("gpt2", case, n, r, True)
        for n in (128, 512)
        for case, r in (
            ("graph_all", 3),
            ("graph_value", 3),
            ("graph_contrast", 3),
            ("eap", 3),
            ("edge_patching", 1),
        )
    ]
    + [("gpt2", case, 128, 3, True) for case in ("adjoint_heads", "adjoint_heads_sae")]
    # (g) feature graphs on the zoo ioi model with its transcoders, 15-token example prompt
    + [
        ("zoo-ioi", case, 15, r, True)
        for case, r in (
            ("forward", 50),
            ("feature_value", 10),
            ("feature_value_ct", 10),
            ("feature_symmetric", 10),
            ("feature_symmetric_kinds", 5),
            ("feature_contrast", 5),
        )
    ]
    + [
        ("gpt2", case, 256, r, w)
        for case, r, w in (
            ("forward", 3, True),
            ("adjoint_heads", 3, True),
            ("head_ablation", 1, False),
            ("adjoint_neurons", 3, True),
            ("reference_grouped", 1, False),
            ("neuron_ablation", 1, False),
        )
    ]
)
QUICK = [(c, case, 128, 1, True) for (c, case, n, _, _) in FULL if n == 128]

#: (numerator, denominator, bound, comparison) for the issue's targets, at a config and length.
RATIOS = [
    ("(a) adjoint all tokens+heads+neurons / run_with_cache", "adjoint_all", "forward", 2.5, "<="),
    ("(a) adjoint all / attribution patching", "adjoint_all", "atp", 1.0, "<="),
    (
        "(a') adjoint all, QK-aware (symmetric) split / run_with_cache",
        "adjoint_all_qk",
        "forward",
        4.0,
        "<=",
    ),
    (
        "(b) forward mode, n comps / n plain forwards",
        "forward_mode_tokens",
        "plain_forwards_n",
        1.5,
        "<=",
    ),
    (
        "(b') forward mode, QK-aware split / n plain forwards",
        "forward_mode_tokens_qk",
        "plain_forwards_n",
        1.5,
        "<=",
    ),
    ("(c) per-head ablation / adjoint heads", "head_ablation", "adjoint_heads", 50.0, ">="),
    (
        "(f) adjoint heads + all active latents of a 16k-latent SAE / adjoint heads",
        "adjoint_heads_sae",
        "adjoint_heads",
        2.0,
        "<=",
    ),
    ("(e) all edges, q/k/v + MLPs (symmetric) / run_with_cache", "graph_all", "forward", 3.0, "<="),
    ("(e) all edges (symmetric) / EAP", "graph_all", "eap", 1.0, "<="),
    ("(e) per-edge patching / all edges (symmetric)", "edge_patching", "graph_all", 100.0, ">="),
    ("(e) all edges, patterns frozen / run_with_cache", "graph_value", "forward", None, "<="),
    ("(e) contrastive graph / run_with_cache", "graph_contrast", "forward", None, "<="),
    ("(e) contrastive graph / EAP", "graph_contrast", "eap", None, "<="),
    ("(g) feature graph, patterns frozen / run_with_cache", "feature_value", "forward", 20.0, "<="),
    (
        "(g) feature graph, circuit-tracer's conventions / run_with_cache",
        "feature_value_ct",
        "forward",
        20.0,
        "<=",
    ),
    (
        "(g) feature graph, symmetric, no edge kinds / run_with_cache",
        "feature_symmetric",
        "forward",
        20.0,
        "<=",
    ),
    (
        "(g) feature graph, symmetric, value/query/key kinds / run_with_cache",
        "feature_symmetric_kinds",
        "forward",
        None,
        "<=",
    ),
    ("(g) contrastive feature graph / run_with_cache", "feature_contrast", "forward", None, "<="),
    (
        "(d) reference grouped forward / adjoint neurons",
        "reference_grouped",
        "adjoint_neurons",
        100.0,
        ">=",
    ),
    ("(d) per-neuron ablation / adjoint neurons", "neuron_ablation", "adjoint_neurons", None, ">="),
]


def run_case(
    config: str, case: str, n_pos: int, repeats: int, warmup: bool, threads: int = 0
) -> dict:
    """One CPU case in a fresh subprocess, so its peak resident memory is its own."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.cases",
        "--config",
        config,
        "--case",
        case,
        "--n-pos",
        str(n_pos),
        "--repeats",
        str(repeats),
    ]
    if not warmup:
        cmd.append("--no-warmup")
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"config": config, "case": case, "n_pos": n_pos, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def only(matrix: list[tuple], word: str) -> list[tuple]:
    """The cases whose config or case name contains ``word``, with their ratios' denominators."""
    chosen = [spec for spec in matrix if word in spec[0] or word in spec[1]]
    keys = {(c, case, n) for c, case, n, _, _ in chosen}
    need = {(c, den, n) for c, case, n in keys for _, num, den, _, _ in RATIOS if num == case}
    return [spec for spec in matrix if (spec[0], spec[1], spec[2]) in keys | need]


def ratio_rows(results: list[dict]) -> list[dict]:
    index = {(r["config"], r["case"], r["n_pos"]): r for r in results if "seconds" in r}
    rows = []
    for label, num, den, bound, cmp in RATIOS:
        for (config, case, n_pos), r in sorted(index.items()):
            if case != num or (config, den, n_pos) not in index:
                continue
            value = r["seconds"] / index[(config, den, n_pos)]["seconds"]
            ok = None if bound is None else (value <= bound if cmp == "<=" else value >= bound)
            rows.append(
                {
                    "ratio": label,
                    "config": config,
                    "n_pos": n_pos,
                    "value": value,
                    "target": None if bound is None else f"{cmp} {bound:g}",
                    "met": ok,
                }
            )
    return rows


def machine() -> str:
    """One line naming where the numbers come from: CPU model and cores, memory, versions."""
    import datetime
    import importlib.metadata
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem = f"{int(fh.readline().split()[1]) / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        mem = "? GiB"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tl = importlib.metadata.version("transformer-lens")
    return (
        f"Measured {datetime.date.today()} on {cpu}, {cores} cores, {mem}; torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), TransformerLens {tl}."
    )


def markdown(results: list[dict], rows: list[dict]) -> str:
    lines = [machine(), ""]
    lines += ["| ratio | config | tokens | measured | target | met |", "|---|---|---|---|---|---|"]
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append(
            f"| {row['ratio']} | {row['config']} | {row['n_pos']} | {row['value']:.2f}x |"
            f" {row['target'] or ''} | {met} |"
        )
    lines += [
        "",
        "| config | case | tokens | seconds | peak extra memory (MiB) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "seconds" not in r:
            lines.append(f"| {r['config']} | {r['case']} | {r['n_pos']} | error | | |")
            continue
        note = (
            f"extrapolated x{r['extrapolation']:.0f} from a sample"
            if r["extrapolation"] != 1
            else ""
        )
        if r.get("statistic") == "fastest":
            note = f"fastest of {r['repeats']}"
        lines.append(
            f"| {r['config']} | {r['case']} | {r['n_pos']} | {r['seconds']:.3f} |"
            f" {r['peak_extra_bytes'] / 2**20:.0f} | {note} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: list[dict], device: str = "cpu") -> go.Figure:
    fig = go.Figure()
    for config in sorted({r["config"] for r in results}):
        for case in ("forward", "adjoint_all", "adjoint_all_qk", "atp"):
            pts = sorted(
                (r["n_pos"], r["seconds"])
                for r in results
                if r.get("case") == case and r["config"] == config and "seconds" in r
            )
            if len(pts) > 1:
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] for p in pts],
                        y=[p[1] for p in pts],
                        mode="lines+markers",
                        name=f"{config}: {case}",
                    )
                )
    fig.update_layout(
        title=f"Cost vs prompt length (random-weight GPT-2-small / LLaMA-style, {device})",
        xaxis_title="prompt tokens",
        yaxis_title="seconds (median)",
        xaxis_type="log",
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


def update_docs(
    table: str, docs: Path = DOCS, markers: tuple[str, str] = (DOCS_START, DOCS_END)
) -> bool:
    """Replace the results tables in ``docs/benchmarks.md`` (between its markers) by ``table``."""
    text = docs.read_text()
    if markers[0] not in text or markers[1] not in text:
        return False
    head, rest = text.split(markers[0], 1)
    _, tail = rest.split(markers[1], 1)
    docs.write_text(f"{head}{markers[0]}\n{table.rstrip()}\n{markers[1]}{tail}")
    return True


def run_in_process(matrix: list[tuple], device: str) -> list[dict]:
    """Every case in this process on ``device`` (CUDA), one model per config."""
    from benchmarks.cases import build, measure  # noqa: PLC0415 - imports torch models

    models: dict[str, object] = {}
    results = []
    for config, case, n_pos, repeats, warmup in tqdm(matrix, desc=f"benchmark cases ({device})"):
        if config not in models:
            models.clear()  # one model on the device at a time
            models[config] = build(config, device)
        results.append(measure(models[config], config, case, n_pos, repeats, warmup))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="128 tokens, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu (subprocess per case) or cuda")
    parser.add_argument("--out", type=Path, default=None, help="default: results/[cuda/]")
    parser.add_argument("--only", help="cases whose config or case contains this (+ denominators)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per CPU case")
    args = parser.parse_args()
    matrix = QUICK if args.quick else FULL
    if args.only:
        matrix = only(matrix, args.only)
        if not matrix:
            raise SystemExit(f"no case's config or name contains {args.only!r}")
    bridge = tl_generation() >= 4  # the models are TransformerBridges
    if args.out is None:
        args.out = RESULTS if args.device == "cpu" else RESULTS / args.device
        args.out = args.out / "tl4" if bridge else args.out
        args.out = args.out / f"only-{args.only}" if args.only else args.out
    if args.device == "cpu":
        results = [
            run_case(*spec, threads=args.threads) for spec in tqdm(matrix, desc="benchmark cases")
        ]
    else:
        results = run_in_process(matrix, args.device)
    rows = ratio_rows(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"cases": results, "ratios": rows}, indent=1))
    table = markdown(results, rows)
    if args.only or args.threads:
        command = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
        table = f"Command: `{command}`  \n{table}"
    (args.out / "results.md").write_text(table)
    if not args.only:
        chart(results, args.device).write_html(
            args.out / "cost_vs_length.html", include_plotlyjs=True
        )
    if args.out == RESULTS and not (args.quick or args.only):  # the docs quote the full matrix
        update_docs(table)
    if args.out == RESULTS / "tl4" and not (args.quick or args.only):
        update_docs(table, markers=DOCS_TL4)
    print(table)


if __name__ == "__main__":
    main()
