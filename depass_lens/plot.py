"""Plotly figures for DePass results. Every function returns a ``plotly.graph_objects.Figure``.

Save with ``fig.write_html(path)`` (always works offline) or :func:`save` (HTML, plus PNG when a
static exporter such as kaleido with a browser is available; otherwise it says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.checks import check_count
from depass_lens.circuits.circuit import Circuit
from depass_lens.circuits.graph import Graph
from depass_lens.circuits.spec import Node
from depass_lens.errors import DePassInputError
from depass_lens.generation import Generation
from depass_lens.results import Attribution

DIVERGING = "RdBu"


def _symmetric_range(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.abs().max()) if finite.numel() else 1.0


def tokens(
    attribution: Attribution,
    str_tokens: Sequence[str] | None = None,
    *,
    batch: int = 0,
    target: int = 0,
    title: str | None = None,
) -> go.Figure:
    """The prompt's tokens as a strip, each coloured by its score (red +, blue -)."""
    batch, target = attribution._batch_index(batch), attribution._target_index(target)
    scores = attribution.tokens()[batch, target].detach().float().cpu()
    labels = [lab for lab in attribution.labels if lab.kind == "token"]
    texts = (
        list(str_tokens)
        if str_tokens is not None
        else [lab.text or f"#{lab.pos}" for lab in labels]
    )
    if len(texts) != len(scores):
        raise DePassInputError(f"{len(texts)} token strings for {len(scores)} token scores")
    bound = _symmetric_range(scores)
    fig = go.Figure(
        go.Heatmap(
            z=[scores.tolist()],
            x=list(range(len(texts))),
            text=[[repr(t)[1:-1] for t in texts]],
            texttemplate="%{text}",
            hovertemplate="%{text}<br>score %{z:.4f}<extra></extra>",
            colorscale=DIVERGING,
            zmin=-bound,
            zmax=bound,
            reversescale=True,
            colorbar={"thickness": 12, "len": 1.4, "nticks": 3},
        )
    )
    fig.update_layout(
        title=title or f"Token attribution to {attribution.target_names[target]}",
        yaxis_visible=False,
        xaxis_title="position",
        height=220,
        template="plotly_white",
    )
    return fig


def heads(
    attribution: Attribution, *, batch: int | None = None, target: int = 0, title: str | None = None
) -> go.Figure:
    """Layer x head heatmap of head scores (mean over the batch unless ``batch`` is given)."""
    target = attribution._target_index(target)
    batch = None if batch is None else attribution._batch_index(batch)
    grid = attribution.heads()[:, target]
    grid = grid.mean(0) if batch is None else grid[batch]
    grid = grid.detach().float().cpu()
    bound = _symmetric_range(grid)
    fig = go.Figure(
        go.Heatmap(
            z=grid.tolist(),
            colorscale=DIVERGING,
            reversescale=True,
            zmin=-bound,
            zmax=bound,
            hovertemplate="L%{y}H%{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Head attribution to {attribution.target_names[target]}",
        xaxis_title="head",
        yaxis_title="layer",
        xaxis_dtick=1,
        yaxis_dtick=1,
        yaxis_autorange="reversed",
        template="plotly_white",
    )
    return fig


def attention_shares(
    attribution: Attribution, *, batch: int | None = None, title: str | None = None
) -> go.Figure:
    """Targets (rows) x components (columns) heatmap of scores, e.g. of ``AttentionScore`` targets.

    Meant for a few targets and a few dozen components (say ``dp.Heads(layer)``). Every component
    is shown, ``rest`` and ``bias`` included, so each row sums (per start point) to its target's
    value. Scores are the mean over the batch unless ``batch`` is given; the colour scale is
    centred at 0 (red +, blue -), and small grids print each value in its cell.
    """
    batch = None if batch is None else attribution._batch_index(batch)
    grid = attribution.scores.detach().float().cpu()
    grid = grid.mean(0) if batch is None else grid[batch]
    bound = _symmetric_range(grid)
    columns = [str(label) for label in attribution.labels]
    rows = list(attribution.target_names)
    # Positions, not names, on the axes: labels may repeat (one ``bias`` per start point).
    fig = go.Figure(
        go.Heatmap(
            z=grid.tolist(),
            x=list(range(len(columns))),
            y=list(range(len(rows))),
            text=[[f"{row} <- {col}" for col in columns] for row in rows],
            texttemplate="%{z:.2f}" if grid.numel() <= 200 else None,
            hovertemplate="%{text}: %{z:.4f}<extra></extra>",
            colorscale=DIVERGING,
            reversescale=True,
            zmin=-bound,
            zmax=bound,
        )
    )
    n_prompts = attribution.scores.shape[0]
    default = f"Shares of {rows[0]}" if len(rows) == 1 else f"Shares of {len(rows)} targets"
    if batch is None and n_prompts > 1:
        default += f" (mean of {n_prompts} prompts)"
    fig.update_layout(
        title=title or default,
        xaxis={
            "title": "component",
            "tickmode": "array",
            "tickvals": list(range(len(columns))),
            "ticktext": columns,
        },
        yaxis={
            "title": "target",
            "tickmode": "array",
            "tickvals": list(range(len(rows))),
            "ticktext": rows,
            "autorange": "reversed",
        },
        template="plotly_white",
    )
    return fig


def neurons(
    attribution: Attribution,
    *,
    k: int = 20,
    batch: int | None = None,
    target: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Bars of the ``k`` neurons with the largest absolute score."""
    k = check_count(k, "k")
    target = attribution._target_index(target)
    batch = None if batch is None else attribution._batch_index(batch)
    attribution.of_kind("neuron")  # an error naming the problem if there are none
    index = [i for i, lab in enumerate(attribution.labels) if lab.kind == "neuron"]
    scores = attribution.scores[:, target][:, index]
    scores = (scores.mean(0) if batch is None else scores[batch]).detach().float().cpu()
    order = scores.abs().argsort(descending=True)[:k].tolist()
    names = [str(attribution.labels[index[i]]) for i in order]
    values = [float(scores[i]) for i in order]
    fig = go.Figure(
        go.Bar(
            x=values[::-1],
            y=names[::-1],
            orientation="h",
            marker_color=["#b2182b" if v > 0 else "#2166ac" for v in values[::-1]],
        )
    )
    fig.update_layout(
        title=title or f"Top {len(order)} neurons for {attribution.target_names[target]}",
        xaxis_title="score",
        yaxis={"type": "category", "dtick": 1},
        template="plotly_white",
        height=max(300, 22 * len(order)),
    )
    return fig


def layer_contributions(
    per_layer: Float[Tensor, "layer comp"],
    names: Sequence[str],
    *,
    title: str = "Contribution of each component, layer by layer",
    layer_names: Sequence[str] | None = None,
) -> go.Figure:
    """One line per component: its share of the target read out after each layer."""
    values = per_layer.detach().float().cpu()
    x = list(layer_names) if layer_names is not None else list(range(values.shape[0]))
    fig = go.Figure()
    for c, name in enumerate(names):
        fig.add_trace(go.Scatter(x=x, y=values[:, c].tolist(), mode="lines+markers", name=name))
    fig.update_layout(
        title=title,
        xaxis_title="layer",
        yaxis_title="share of target",
        xaxis_dtick=1,
        template="plotly_white",
    )
    return fig


def subspace_scatter(
    points: Float[Tensor, "n 2"],
    labels: Sequence[str],
    *,
    title: str = "2-D projection",
    axis_names: tuple[str, str] = ("component 1", "component 2"),
    hover: Sequence[str] | None = None,
) -> go.Figure:
    """A 2-D projection of hidden states (e.g. onto a probe and a meaning direction), by label."""
    pts = points.detach().float().cpu()
    fig = go.Figure()
    for group in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == group]
        fig.add_trace(
            go.Scatter(
                x=pts[rows, 0].tolist(),
                y=pts[rows, 1].tolist(),
                mode="markers",
                name=group,
                text=[hover[i] for i in rows] if hover is not None else None,
            )
        )
    fig.update_layout(
        title=title, xaxis_title=axis_names[0], yaxis_title=axis_names[1], template="plotly_white"
    )
    return fig


def generation(gen: Generation) -> go.Figure:
    """Generated tokens (rows) citing earlier tokens (columns); the prompt columns are marked."""
    scores = gen.scores.detach().float().cpu()
    bound = _symmetric_range(scores)
    columns = [f"{i}:{t!r}" for i, t in enumerate(gen.str_tokens)]
    rows = [f"{gen.prompt_length + i}:{t!r}" for i, t in enumerate(gen.generated)]
    fig = go.Figure(
        go.Heatmap(
            z=scores.tolist(),
            x=columns,
            y=rows,
            colorscale=DIVERGING,
            reversescale=True,
            zmin=-bound,
            zmax=bound,
            hovertemplate="%{y} cites %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.add_vrect(
        x0=-0.5,
        x1=gen.prompt_length - 0.5,
        line_width=2,
        line_color="black",
        fillcolor="rgba(0,0,0,0)",
        annotation_text="prompt",
    )
    fig.update_layout(
        title="Generate and cite: which earlier tokens each new token leans on",
        yaxis_autorange="reversed",
        template="plotly_white",
    )
    return fig


#: Edge colours by the receiving input (edges into the target: direct effect).
EDGE_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "mlp": "#ff7f0e", "direct": "#444"}
#: Horizontal offset where an edge arrives at a head, so q, k and v edges stay apart.
_SIDE_OFFSET = {"q": -0.15, "k": 0.0, "v": 0.15}


def _node_xy(node: Node, n_heads: int) -> tuple[float, float]:
    """Layers bottom to top (attention row, then MLP row); heads left to right."""
    if node.kind in ("embed", "token"):
        x = (n_heads - 1) / 2 if node.kind == "embed" else float(node.index or 0) * 0.8
        return x, -1.0
    if node.kind == "target":
        return (n_heads - 1) / 2, float(node.layer)
    if node.kind == "head":
        return float(node.index or 0), float(node.layer)
    if node.kind == "bias":
        return n_heads + 1.6, float(node.layer)
    offset = (node.index or 0) * 0.7 if node.kind == "neurons" else 0.0  # MLPs right of the heads
    return n_heads + 0.3 + offset + (0.7 if node.index == -1 else 0.0), node.layer + 0.45


def graph(
    graph: Graph | Circuit,
    *,
    k: int = 40,
    target: int = 0,
    title: str | None = None,
) -> go.Figure:
    """A circuit graph, layers bottom to top.

    Nodes (heads, MLPs, embeddings, the target) are coloured by their score (red +, blue -);
    the ``k`` strongest edges (or a :class:`Circuit`'s edges) are drawn coloured by the input they
    enter (query, key, value, MLP, direct), solid when positive and dotted when negative, wider
    when larger. Hover a node or an edge's midpoint for its numbers.
    """
    circuit = graph if isinstance(graph, Circuit) else None
    g = circuit.graph if circuit is not None else graph
    if not isinstance(g, Graph):
        raise DePassInputError(f"plot.graph needs a Graph or a Circuit, got {type(g).__name__}")
    k = check_count(k, "k")
    target = circuit.target if circuit is not None else g._target_index(target)
    scores = g.scores(target).detach().float().cpu()
    if circuit is not None:
        shown = circuit.edge_indices
    else:
        order = scores.abs().argsort(descending=True).tolist()
        shown = [i for i in order if g.spec.nodes[g.spec.edges[i].sender].kind != "bias"][:k]
    n_heads = 1 + max((n.index or 0) for n in g.spec.nodes if n.kind == "head")
    table = {row["node"]: row for row in g.node_table(target)}
    xy = {i: _node_xy(node, n_heads) for i, node in enumerate(g.spec.nodes)}
    peak = float(scores[shown].abs().max()) if shown else 1.0
    fig = go.Figure()
    mid_x, mid_y, mid_text = [], [], []
    for i in shown:
        edge = g.spec.edges[i]
        (x0, y0), (x1, y1) = xy[edge.sender], xy[edge.receiver]
        x1 += _SIDE_OFFSET.get(edge.kind, 0.0) if g.spec.nodes[edge.receiver].kind == "head" else 0
        value = float(scores[i])
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={
                    "color": EDGE_COLORS[edge.kind],
                    "width": 0.8 + 7.0 * abs(value) / (peak or 1.0),
                    "dash": "solid" if value >= 0 else "dot",
                },
                opacity=0.75,
                hoverinfo="skip",
                showlegend=False,
            )
        )
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_text.append(f"{g.edge_name(i)}<br>score {value:+.4f}")
    for kind, color in EDGE_COLORS.items():  # legend entries for the edge types
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="lines", line={"color": color}, name=f"{kind} edge")
        )
    fig.add_trace(
        go.Scatter(
            x=mid_x,
            y=mid_y,
            mode="markers",
            marker={"size": 6, "color": "rgba(0,0,0,0.15)"},
            text=mid_text,
            hovertemplate="%{text}<extra></extra>",
            showlegend=False,
        )
    )
    touched = {g.spec.edges[i].sender for i in shown} | {g.spec.edges[i].receiver for i in shown}
    nodes = [i for i, n in enumerate(g.spec.nodes) if n.kind != "bias" or i in touched]
    values = [table[g.spec.nodes[i].name]["score"] for i in nodes]
    inner = [v for i, v in zip(nodes, values) if g.spec.nodes[i].kind != "target"]
    bound = max((abs(v) for v in inner), default=1.0) or 1.0  # the target's value would dominate
    hover = []
    for i in nodes:
        row = table[g.spec.nodes[i].name]
        parts = [f"<b>{row['node']}</b>", f"score {row['score']:+.4f}"]
        for key in ("inflow", "outflow", "own_bias"):
            if row.get(key) is not None and (key != "own_bias" or row[key]):
                parts.append(f"{key} {row[key]:+.4f}")
        hover.append("<br>".join(parts))
    fig.add_trace(
        go.Scatter(
            x=[xy[i][0] for i in nodes],
            y=[xy[i][1] for i in nodes],
            mode="markers+text",
            text=[g.spec.nodes[i].name for i in nodes],
            textposition="top center",
            textfont={"size": 10},
            marker={
                "size": [18 if i in touched else 10 for i in nodes],
                "color": values,
                "colorscale": DIVERGING,
                "reversescale": True,
                "cmin": -bound,
                "cmax": bound,
                "line": {"width": 1, "color": "#333"},
                "colorbar": {"title": "node score", "x": 1.02},
                "symbol": ["square" if g.spec.nodes[i].kind != "head" else "circle" for i in nodes],
            },
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
        )
    )
    label = f"{len(shown)} edges" if circuit is None else f"circuit of {circuit.n_edges} edges"
    n_layers = max(n.layer for n in g.spec.nodes)
    fig.update_layout(
        title=title
        or f"{g.method}: {label}, {g.target_names[target]}<br><sub>{g.describe()}</sub>",
        template="plotly_white",
        height=260 + 150 * n_layers,
        width=max(640, 110 * (n_heads + 3)),
        xaxis={"visible": False},
        yaxis={
            "tickvals": [-1, *range(n_layers)],
            "ticktext": ["embed", *[f"layer {layer}" for layer in range(n_layers)]],
            "zeroline": False,
        },
        legend={"orientation": "h", "y": -0.05},
    )
    return fig


def latents(
    attribution: Attribution, model: object, sae: object, *, k: int = 15, **kwargs: object
) -> go.Figure:
    """Top SAE latents for a target, each with its decoder logit lens (top promoted tokens).

    ``attribution`` comes from an :class:`~depass_lens.SAELatents` source; ``model`` is the
    ``HookedTransformer`` or its :class:`~depass_lens.DePass` wrapper; ``sae`` the source's SAE.
    Other keywords: ``lens_k``, ``batch``, ``target``, ``title``.
    """
    from depass_lens.depass import DePass  # noqa: PLC0415 - the wrapper imports this module's deps
    from depass_lens.sae.lens import latents_figure  # noqa: PLC0415

    unknown = sorted(set(kwargs) - {"lens_k", "batch", "target", "title"})
    if unknown:
        raise DePassInputError(f"plot.latents: unknown keyword(s) {unknown}")
    kwargs["target"] = attribution._target_index(kwargs.get("target", 0))  # type: ignore[arg-type]
    if kwargs.get("batch") is not None:
        kwargs["batch"] = attribution._batch_index(kwargs["batch"])  # type: ignore[arg-type]
    k = check_count(k, "k")
    check_count(kwargs.get("lens_k", 3), "lens_k", minimum=0)
    adapter = model.adapter if isinstance(model, DePass) else DePass(model, progress=False).adapter  # type: ignore[arg-type]
    return latents_figure(attribution, adapter, sae, k=k, **kwargs)  # type: ignore[arg-type]


def save(fig: go.Figure, path: str | Path, *, png: bool = True) -> list[Path]:
    """Write ``path`` as self-contained HTML and, if possible, a PNG beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs=True)
    if png:
        try:
            fig.write_image(path.with_suffix(".png"))
            written.append(path.with_suffix(".png"))
        except Exception as exc:  # noqa: BLE001 - kaleido/Chrome missing is expected offline
            print(f"PNG export unavailable ({type(exc).__name__}: {exc}); wrote HTML only")
    return written
