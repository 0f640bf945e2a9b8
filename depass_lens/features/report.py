"""One call from a prompt to an explorer page: graph, pruning, lens, examples, JSON, HTML.

``depass-lens feature-graph`` runs :func:`run_feature_graph`; notebooks can too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depass_lens.features.export import Examples, to_explorer_json, to_neuronpedia_json
from depass_lens.features.graph import FeatureGraph
from depass_lens.features.lens import decoder_lens
from depass_lens.features.prune import Pruned, graph_scores, prune
from depass_lens.features.sites import place_sites


@dataclass
class FeatureGraphReport:
    """What :func:`run_feature_graph` made and measured."""

    graph: FeatureGraph
    pruned: Pruned
    data: dict[str, Any]
    scores: dict[str, float]
    seconds: float
    written: list[Path]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            counts[node.kind] = counts.get(node.kind, 0) + 1
        kept = int(self.pruned.nodes.sum())
        edges = int((self.graph.edges != 0).sum())
        gaps = self.graph.check()
        lines = [
            f"feature graph: {len(self.graph.nodes)} nodes ({counts.get('latent', 0)} latents), "
            f"{edges} non-zero edges, {self.seconds:.2f} s; attention={self.graph.attention}",
            f"pruned: {kept} nodes, {int(self.pruned.edges.sum())} edges",
            "scores: " + ", ".join(f"{k} {v:.3f}" for k, v in self.scores.items()),
            "exactness (largest relative gap): "
            + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()),
        ]
        lines += [f"wrote {p}" for p in self.written]
        return "\n".join(lines)


def run_feature_graph(
    depass: Any,
    prompt: str,
    target: Any,
    dictionaries: Sequence[Any],
    out: str | Path | None = None,
    *,
    attention: str | None = None,
    contrast: str | None = None,
    model_name: str | None = None,
    examples: Examples | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    json_out: str | Path | None = None,
    neuronpedia_out: str | Path | None = None,
) -> FeatureGraphReport:
    """The feature graph of ``prompt`` (a :class:`~depass_lens.DePass`'s ``feature_graph``),
    pruned, with the decoder lens of the kept latents, written as an explorer page (``out``),
    its JSON (``json_out``) and circuit-tracer / Neuronpedia graph JSON (``neuronpedia_out``)."""
    from depass_lens.explorer import write_explorer  # noqa: PLC0415 - the page's assets

    start = time.perf_counter()
    graph = depass.feature_graph(
        prompt, target, dictionaries=dictionaries, attention=attention, contrast=contrast
    )
    seconds = time.perf_counter() - start
    pruned = prune(graph, node_threshold, edge_threshold)
    sites = place_sites(depass.adapter, dictionaries)
    kept = pruned.nodes.nonzero().flatten().tolist()
    lens = decoder_lens(depass.adapter, sites, graph, kept)
    data = to_explorer_json(
        graph, pruned, model=model_name, prompt=prompt, lens=lens, examples=examples
    )
    data["pruning"] = {
        **(data.get("pruning") or {}),
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
    }
    written = []
    if out is not None:
        written.append(write_explorer(data, out))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(data))
        written.append(Path(json_out))
    if neuronpedia_out is not None:
        np_data = to_neuronpedia_json(
            graph,
            pruned,
            graph.settings["token_ids"],
            slug=Path(neuronpedia_out).stem,
            scan=model_name or "depass",
            target_token_ids=graph.settings.get("target_tokens"),
            node_threshold=node_threshold,
        )
        Path(neuronpedia_out).write_text(json.dumps(np_data))
        written.append(Path(neuronpedia_out))
    return FeatureGraphReport(graph, pruned, data, graph_scores(graph), seconds, written)


def zoo_examples(model: str, sites_by_layer: Mapping[int, str]) -> Examples:
    """The zoo dictionaries' top-activating prompts, keyed by the graph's site names."""
    from depass_lens.zoo.saes import dictionary_keys, top_examples  # noqa: PLC0415

    out: dict[str, Any] = {}
    for key in dictionary_keys(model):
        layer = int(key.split(".")[0].removeprefix("L"))
        if layer in sites_by_layer:
            try:
                out[sites_by_layer[layer]] = top_examples(model, key)
            except KeyError:
                continue
    return out


__all__ = ["FeatureGraphReport", "run_feature_graph", "zoo_examples"]
