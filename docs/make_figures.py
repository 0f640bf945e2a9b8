"""Regenerate the screenshots of docs/figures.md from the zoo models.

Usage: ``python docs/make_figures.py [--out docs/img] [--html build/figures] [--only scale ...]``

Every figure of the gallery is built from the shipped zoo models with fixed prompts and seeds,
written as self-contained HTML (plotly.js embedded, so no network is needed) and, when Chromium is
installed, screenshotted with headless Chromium into ``--out`` as PNG. Without Chromium (on Debian:
``apt-get install -y chromium``) it says so and writes the HTML only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

import depass_lens as dp
from depass_lens import plot, zoo

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
WIDTH = 950
IOI_PROMPT = "When Mary and John went to the store , John gave a drink to"
CITE_PROMPT = "When Alice and Bob went to the park , Bob gave a ball to"
N_PROMPTS = 48  # prompts averaged in the batch figures
SEED = 0  # seed of the zoo task batches


@dataclass
class Figure:
    name: str  # file stem in docs/img
    fig: go.Figure
    height: int  # pixels; the width is WIDTH
    note: str  # the numbers worth checking in the picture, printed when it is written


def _quiet(model) -> dp.DePass:
    return dp.DePass(model, progress=False)


def ioi_figures() -> list[Figure]:
    """Tokens, heads, neurons and layer-by-layer shares of the IO - S logit difference."""
    model = zoo.load("ioi")
    depass = _quiet(model)
    target = dp.LogitDiff("Mary", "John")
    tokens = depass.attribute(IOI_PROMPT, target)
    str_tokens = depass.prepare(IOI_PROMPT).str_tokens[0]
    token_scores = tokens.tokens()[0, 0]
    top_tokens = ", ".join(f"{name} {value:+.1f}" for name, value in tokens.top(3))
    figures = [
        Figure(
            "tokens",
            plot.tokens(
                tokens,
                str_tokens,
                title=f"Token shares of {tokens.target_names[0]}, zoo ioi model",
            ),
            240,
            f"target {float(tokens.target_values[0, 0]):.2f}; top tokens {top_tokens}",
        )
    ]

    batch = zoo.task("ioi").batch(model, N_PROMPTS, seed=SEED)
    io_s = dp.LogitDiff(batch.answers, batch.wrong, name="IO - S")
    heads = depass.attribute(batch.tokens, io_s, dp.Heads())
    grid = heads.heads()[:, 0].mean(0)
    figures.append(
        Figure(
            "heads",
            plot.heads(
                heads,
                title=f"Head shares of the IO - S logit difference (mean of {N_PROMPTS} prompts)",
            ),
            440,
            f"L1H0 {float(grid[1, 0]):.2f}, L1H1 {float(grid[1, 1]):.2f}, "
            f"largest elsewhere {float(grid[[0, 2]].abs().max()):.2f}",
        )
    )

    k = 15
    neurons = depass.attribute(batch.tokens, io_s, dp.Neurons())
    mean = neurons.scores[:, 0].mean(0)
    index = [i for i, label in enumerate(neurons.labels) if label.kind == "neuron"]
    best = sorted(index, key=lambda i: -abs(float(mean[i])))[:3]
    top_neurons = ", ".join(f"{neurons.labels[i]} {float(mean[i]):+.3f}" for i in best)
    figures.append(
        Figure(
            "neurons",
            plot.neurons(
                neurons,
                k=k,
                title=f"Top {k} neurons for {neurons.target_names[0]} "
                f"(mean of {N_PROMPTS} prompts), zoo ioi model",
            ),
            480,
            f"mean IO - S {float(neurons.target_values.mean()):.2f}; "
            f"largest mean shares {top_neurons}",
        )
    )

    lens = depass.run(IOI_PROMPT, dp.Tokens()).logit_lens(target)[:, 0].detach()  # layer comp
    order = lens[-1, :-1].abs().argsort(descending=True)[:5].tolist()
    names = [f"{i}:{str_tokens[i]}" for i in order]
    figures.append(
        Figure(
            "layers",
            plot.layer_contributions(
                lens[:, order],
                names,
                title=f"Token shares of {tokens.target_names[0]}, read out after each layer",
            ),
            460,
            "last layer: "
            + ", ".join(f"{n} {float(lens[-1, i]):+.1f}" for n, i in zip(names, order))
            + f"; all tokens + bias {float(lens[-1].sum()):.2f} = "
            f"{float(token_scores.sum() + tokens.bias[0, 0]):.2f}",
        )
    )

    gen = depass.generate(CITE_PROMPT, 3)
    figures.append(
        Figure(
            "generation",
            dp.plot.generation(gen),
            540,
            f"generated {gen.generated}; first token's top citation: position "
            f"{int(gen.scores[0].argmax())} ({gen.str_tokens[int(gen.scores[0].argmax())]!r}) "
            f"{float(gen.scores[0].max()):+.1f}",
        )
    )
    return figures


def subspace_figure() -> Figure:
    """The bilingual model's stream on its language probe vs the top PC of the rest."""
    model = zoo.load("bilingual")
    probe = zoo.info("bilingual")["probe"]
    direction = torch.tensor(probe["direction"])
    batch = zoo.task("bilingual").batch(model, 200, seed=3)
    _, cache = model.run_with_cache(batch.tokens, names_filter=probe["hook"])
    states = cache[probe["hook"]][:, -1]
    along = states @ direction
    rest = states - along[:, None] * direction
    torch.manual_seed(0)  # pca_lowrank is randomised
    _, _, v = torch.pca_lowrank(rest, q=1)
    points = torch.stack([along, (rest @ v)[:, 0]], dim=1)
    labels = [str(label) for label in batch.labels]
    means = {g: float(along[[lab == g for lab in labels]].mean()) for g in sorted(set(labels))}
    return Figure(
        "subspace",
        plot.subspace_scatter(
            points,
            labels,
            axis_names=("language probe", "top PC of the rest"),
            title="bilingual model: residual stream at the probe layer, by language",
        ),
        500,
        "mean probe reading " + ", ".join(f"{g} {m:+.2f}" for g, m in means.items()),
    )


def qk_figure() -> Figure:
    """K-composition: which layer-0 head writes the keys each induction head matches."""
    model = zoo.load("induction")
    task = zoo.task("induction")
    examples = task.examples(N_PROMPTS, seed=SEED)
    batch = task.batch(model, N_PROMPTS, seed=SEED)
    # the token after the earlier copy of the last token (BOS is position 0)
    key = torch.tensor([ex.words.index(ex.words[-1]) + 2 for ex in examples])
    targets = [
        dp.AttentionScore(1, h, -1, key, side="key", name=f"L1H{h}")
        for h in range(model.cfg.n_heads)
    ]
    shares = _quiet(model).attribute(batch.tokens, targets, dp.Heads(0))
    prev = [str(label) for label in shares.labels].index("L0H1")
    fraction = shares.scores[..., prev].mean(0) / shares.target_values.mean(0)
    return Figure(
        "qk",
        plot.attention_shares(
            shares,
            title="Who writes the keys the induction heads look for<br><sup>key-side shares of "
            "each layer-1 head's score from the last token to the token after its earlier copy "
            f"(mean of {N_PROMPTS} prompts)</sup>",
        ),
        420,
        "L0H1's fraction of each head's mean score: "
        + ", ".join(f"{n} {float(f):.0%}" for n, f in zip(shares.target_names, fraction))
        + f"; mean scores {[round(float(v), 2) for v in shares.target_values.mean(0)]}",
    )


#: ``python -m benchmarks.scale --shapes gpt2-small --n-pos 256 512 1024 2048 --dtype float32
#: --device cpu --out benchmarks/results/scale_cpu_gpt2_lengths.md`` writes it.
SCALE_ROWS = ROOT / "benchmarks" / "results" / "scale_cpu_gpt2_lengths.jsonl"
SCALE_SHAPE = dict(n_layers=12, n_heads=12)  # GPT-2 small, for the attention-pattern guide


def quadratic_fit(tokens: np.ndarray, gib: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``gib = a + b p + c p^2``: ``(a, b, c)``."""
    design = np.stack([np.ones_like(tokens), tokens, tokens**2], axis=1)
    coef, *_ = np.linalg.lstsq(design, gib, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def scale_figure() -> Figure:
    """Peak memory against prompt length, per case, beside one copy of every layer's attention
    pattern (the ``query x key`` size the model's own attention has)."""
    rows = [json.loads(line) for line in SCALE_ROWS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "peak_bytes" in r]
    fig = go.Figure()
    notes = []
    pattern_gib = SCALE_SHAPE["n_layers"] * SCALE_SHAPE["n_heads"] * 4 / 2**30  # per token^2
    for case in dict.fromkeys(r["case"] for r in rows):
        points = sorted((r["n_pos"], r["peak_bytes"] / 2**30) for r in rows if r["case"] == case)
        tokens, gib = (np.array(v, dtype=float) for v in zip(*points))
        fig.add_trace(go.Scatter(x=tokens, y=gib, mode="lines+markers", name=case))
        if len(points) >= 3:
            a, b, c = quadratic_fit(tokens, gib)
            notes.append(
                f"{case}: {a:.2f} GiB + {b * 1024:.2f} GiB per 1k tokens + "
                f"{c / pattern_gib:.1f} pattern copies"
            )
    tokens = np.array(sorted({r["n_pos"] for r in rows}), dtype=float)
    fig.add_trace(
        go.Scatter(
            x=tokens,
            y=pattern_gib * tokens**2,
            mode="lines",
            line=dict(dash="dot", color="grey"),
            name="one copy of all layers' attention patterns",
        )
    )
    fig.update_layout(
        title="Peak memory against prompt length<br><sup>GPT-2-small-shaped random model, "
        "float32, CPU (resident memory of the whole process, model included, peak over the timed "
        "calls)</sup>",
        xaxis=dict(
            title="tokens", type="log", tickvals=tokens, ticktext=[f"{t:.0f}" for t in tokens]
        ),
        yaxis_title="peak memory (GiB)",
        template="plotly_white",
        legend=dict(x=0.01, y=0.99),
    )
    return Figure("scale_memory", fig, 480, "; ".join(notes))


#: ``python -m benchmarks.feature_faithfulness`` writes it.
FEATURE_RESULTS = ROOT / "benchmarks" / "results" / "feature_faithfulness.json"
FEATURE_COLOURS = {
    "depass-contrast": "#ff7f0e",
    "depass-contrast-total": "#d62728",
    "depass-symmetric": "#9467bd",
    "depass-symmetric-total": "#e377c2",
    "depass-value": "#8c564b",
    "depass-value-total": "#bcbd22",
    "circuit-tracer": "#7f7f7f",
    "attribution patching": "#1f77b4",
    "integrated gradients": "#2ca02c",
}


def feature_faithfulness_figure() -> Figure:
    """Faithfulness against latents kept, per zoo model (columns) and semantics of the kept
    latents (rows: fixed, live), every method of the benchmark."""
    models = json.loads(FEATURE_RESULTS.read_text())["models"]
    names = list(models)
    rows = ["fixed", "live"]
    fig = make_subplots(
        rows=len(rows),
        cols=len(names),
        subplot_titles=[f"{m}, kept latents {r}" for r in rows for m in names],
        horizontal_spacing=0.04,
        vertical_spacing=0.14,
    )
    notes = []
    for i, circuit in enumerate(rows, start=1):
        for j, model in enumerate(names, start=1):
            entry = models[model]["curves"][circuit]
            for method, curve in entry["curves"].items():
                fig.add_trace(
                    go.Scatter(
                        x=curve["budgets"],
                        y=curve["faithfulness"],
                        mode="lines",
                        name=method,
                        legendgroup=method,
                        showlegend=i == 1 and j == 1,
                        line=dict(color=FEATURE_COLOURS.get(method), width=2),
                    ),
                    row=i,
                    col=j,
                )
            fig.update_xaxes(type="log", row=i, col=j, title_text="latents kept" if i == 2 else "")
            areas = entry["areas"]
            best = max(areas, key=areas.__getitem__)
            notes.append(f"{model}/{circuit}: best {best} {areas[best]:.3f}")
    fig.update_yaxes(title_text="faithfulness", col=1)
    fig.update_layout(
        title="Feature circuits: faithfulness against latents kept (the rest corrupted)",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.14),
        margin=dict(t=70, b=110),
    )
    return Figure("feature_faithfulness", fig, 640, "; ".join(notes))


BUILDERS: dict[str, Callable[[], list[Figure]]] = {
    "ioi": ioi_figures,
    "subspace": lambda: [subspace_figure()],
    "qk": lambda: [qk_figure()],
    "scale": lambda: [scale_figure()],
    "feature_faithfulness": lambda: [feature_faithfulness_figure()],
}


def write_html(figure: Figure, folder: Path) -> Path:
    """Self-contained HTML sized exactly like the screenshot, without plotly's toolbar."""
    figure.fig.update_layout(width=WIDTH, height=figure.height)
    html = figure.fig.to_html(
        full_html=True, include_plotlyjs=True, config={"displayModeBar": False}
    )
    style = "<style>html, body { margin: 0; padding: 0; overflow: hidden; }</style>"
    html = html.replace("<head>", f"<head>{style}", 1)
    path = folder / f"{figure.name}.html"
    path.write_text(html, encoding="utf-8")
    return path


def screenshot(chromium: str, html: Path, png: Path, width: int, height: int) -> None:
    """Headless Chromium, offline, with a fresh profile, at exactly ``width x height``."""
    with tempfile.TemporaryDirectory(prefix="make-figures-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html.resolve().as_uri(),
        ]
        png.unlink(missing_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0 or not png.exists():
        raise RuntimeError(f"Chromium failed on {html} ({result.returncode}): {result.stderr}")


def find_chromium() -> str | None:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="PNG folder")
    parser.add_argument("--html", type=Path, default=ROOT / "build" / "figures", help="HTML folder")
    parser.add_argument(
        "--only", nargs="+", choices=list(BUILDERS), default=list(BUILDERS), help="figure groups"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.html.mkdir(parents=True, exist_ok=True)
    chromium = find_chromium()
    if chromium is None:
        print(
            f"Chromium not found ({CHROMIUM}; install it with `apt-get install -y chromium`): "
            "writing HTML only, no PNG screenshots."
        )
    for name in args.only:
        for figure in BUILDERS[name]():
            html = write_html(figure, args.html)
            print(f"wrote {html}")
            if chromium is not None:
                png = args.out / f"{figure.name}.png"
                screenshot(chromium, html, png, WIDTH, figure.height)
                print(f"wrote {png} ({WIDTH}x{figure.height})")
            print(f"    {figure.note}")
    if chromium is None:
        print("No PNG written: Chromium is missing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
