"""Feature graphs as JSON: the explorer's own format and circuit-tracer's / Neuronpedia's.

``to_explorer_json`` writes ``depass_lens.feature_graph/1`` (every node kind, edges split by
path class, scores), which :func:`depass_lens.explorer.write_explorer` draws.
``to_neuronpedia_json`` writes the graph JSON that circuit-tracer's ``create_graph_files``
produces and that its and Neuronpedia's viewers load: latents as transcoder features, errors,
token embeddings and logits, with ids in circuit-tracer's scheme. The nodes it has no type for
(position embeddings, constants) are listed, with the part of the target each carries, under
``metadata.depass_nodes_left_out``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from depass_lens.features.graph import FeatureGraph
from depass_lens.features.prune import Pruned, graph_scores

FORMAT = "depass_lens.feature_graph/1"
Examples = Mapping[str, Mapping[int, Sequence[tuple[str, int, str, float]]]]


def _rows(graph: FeatureGraph) -> list[str]:
    n_layers = int(graph.settings.get("n_layers", max(n.layer for n in graph.nodes)))
    return ["embed", *(f"L{layer}" for layer in range(n_layers)), "target"]


def _row_of(layer: int, n_rows: int) -> int:
    return max(0, min(n_rows - 1, layer + 1))


def to_explorer_json(
    graph: FeatureGraph,
    pruned: Pruned | None = None,
    *,
    model: str | None = None,
    prompt: str | None = None,
    lens: Mapping[int, Sequence[tuple[str, float]]] | None = None,
    examples: Examples | None = None,
    min_weight: float = 0.0,
) -> dict[str, Any]:
    """The explorer's JSON for ``graph`` (only ``pruned``'s nodes and edges if given).

    ``lens``: per node index, the decoder's top tokens (:func:`~.lens.decoder_lens`);
    ``examples``: per site and latent, its top-activating prompts ``(text, pos, token, act)``;
    ``min_weight``: leave out edge parts smaller than this in magnitude."""
    keep = pruned.nodes if pruned is not None else torch.ones(len(graph.nodes), dtype=torch.bool)
    kept = keep.nonzero().flatten().tolist()
    new = {old: i for i, old in enumerate(kept)}
    layers = _rows(graph)
    scores = graph.target_scores().detach()
    influence = pruned.influence if pruned is not None else torch.zeros(len(graph.nodes))
    nodes = []
    for old in kept:
        node = graph.nodes[old]
        record: dict[str, Any] = {
            "id": node.name,
            "kind": node.kind,
            "row": _row_of(node.layer, len(layers)),
            "pos": len(graph.tokens) - 1 if node.kind == "target" else node.pos,
            "site": node.site,
            "index": node.index,
            "score": float(scores[old]),
            "influence": max(0.0, float(influence[old])),
            "label": _label(graph, old),
        }
        activation = float(graph.activation[old])
        if activation == activation:  # not NaN
            record["activation"] = activation
        if lens and old in lens:
            record["lens"] = [[t, float(v)] for t, v in lens[old]]
        if examples and node.kind == "latent" and node.site in examples:
            rows = examples[node.site].get(int(node.index or 0), [])
            record["top_prompts"] = [
                {"text": text, "pos": pos, "token": token, "activation": act}
                for text, pos, token, act in rows
            ]
        nodes.append(record)
    edges = []
    edge_mask = pruned.edges if pruned is not None else None
    for r, receiver in enumerate(graph.receivers.tolist()):
        if receiver not in new:
            continue
        for kind, part in graph.kind_edges.items():
            row = part[r].detach()
            mask = (row.abs() > min_weight) & keep
            if edge_mask is not None:
                mask &= edge_mask[r]
            for sender in mask.nonzero().flatten().tolist():
                edges.append([new[sender], new[receiver], kind, float(row[sender])])
    target = graph.targets[0]
    return {
        "format": FORMAT,
        "model": model,
        "prompt": prompt if prompt is not None else "".join(graph.tokens),
        "tokens": list(graph.tokens),
        "target": {"name": graph.nodes[target].name, "value": float(graph.value[target])},
        "attention": "contrast" if graph.attention == "difference" else graph.attention,
        "layers": layers,
        "nodes": nodes,
        "edges": edges,
        "scores": graph_scores(graph),
        "pruning": None
        if pruned is None
        else {"nodes": len(kept), "edges": int(pruned.edges.sum())},
    }


def _label(graph: FeatureGraph, index: int) -> str:
    node = graph.nodes[index]
    if node.kind == "latent":
        return f"{node.site} latent {node.index}"
    if node.kind in ("token", "position") and node.pos is not None:
        return f"{node.kind} {graph.tokens[node.pos]!r}"
    return node.name


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def to_neuronpedia_json(
    graph: FeatureGraph,
    pruned: Pruned,
    token_ids: Sequence[int],
    *,
    slug: str,
    scan: str,
    target_token_ids: Sequence[int] | None = None,
    node_threshold: float | None = None,
) -> dict[str, Any]:
    """circuit-tracer's graph JSON (``metadata``, ``qParams``, ``nodes``, ``links``) for the
    pruned graph: its node ids, feature numbers (Cantor pairing of layer and latent), layer
    labels and feature types, so circuit-tracer's local server and Neuronpedia read it."""
    n_layers = int(graph.settings.get("n_layers", max(n.layer for n in graph.nodes)))
    n_pos = len(graph.tokens)
    ids: dict[int, str] = {}
    taken: set[str] = set()
    nodes: list[dict[str, Any]] = []
    left_out: dict[str, float] = {}
    scores = graph.target_scores().detach()
    targets = graph.targets
    for i in pruned.nodes.nonzero().flatten().tolist():
        node = graph.nodes[i]
        cumulative = float(pruned.cumulative[i])
        record: dict[str, Any]
        if node.kind == "latent":
            layer, index, pos = node.layer, int(node.index or 0), int(node.pos or 0)
            record = _np_node(
                f"{layer}_{index}_{pos}", _cantor(layer, index), str(layer), pos,
                "cross layer transcoder", f"{layer}_{index}-0", influence=cumulative,
                activation=float(graph.activation[i]),
            )  # fmt: skip
        elif node.kind == "error":
            layer, pos = node.layer, int(node.pos or 0)
            record = _np_node(
                f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error",
                f"{layer}_{pos}-0", influence=cumulative,
            )  # fmt: skip
        elif node.kind == "token":
            pos = int(node.pos or 0)
            vocab = int(token_ids[pos])
            record = _np_node(
                f"E_{vocab}_{pos}", pos, "E", pos, "embedding", f"E_{vocab}-{pos}",
                influence=cumulative,
            )  # fmt: skip
        elif node.kind == "target":
            k = targets.index(i)
            probabilities = graph.settings.get("target_probabilities") or [0.0] * len(targets)
            vocab = int(target_token_ids[k]) if target_token_ids is not None else k
            layer = str(n_layers + 1)
            record = _np_node(
                f"{layer}_{vocab}_{n_pos - 1}", vocab, layer, n_pos - 1, "logit",
                f"L_{vocab}-{n_pos - 1}", token_prob=float(probabilities[k]),
                is_target_logit=k == 0,
                clerp=f"Output {node.name} (p={float(probabilities[k]):.3f})",
            )  # fmt: skip
        else:  # positions and constants: no circuit-tracer type
            left_out[node.name] = float(scores[i])
            continue
        if record["node_id"] in taken:  # circuit-tracer's error ids can meet a latent's
            record["node_id"] = f"{record['node_id']}_{node.kind}"
        taken.add(record["node_id"])
        ids[i] = record["node_id"]
        nodes.append(record)
    links = []
    for r, receiver in enumerate(graph.receivers.tolist()):
        if receiver not in ids:
            continue
        row = graph.edges[r].detach()
        for sender in pruned.edges[r].nonzero().flatten().tolist():
            if sender in ids:
                links.append(
                    {"source": ids[sender], "target": ids[receiver], "weight": float(row[sender])}
                )
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": list(graph.tokens),
            "prompt": "".join(graph.tokens),
            "node_threshold": node_threshold,
            "schema_version": 1,
            "depass_nodes_left_out": left_out,
            "depass_attention": graph.attention,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def _np_node(
    node_id: str,
    feature: int,
    layer: str,
    ctx_idx: int,
    feature_type: str,
    js_id: str,
    **extra: Any,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": ctx_idx,
        "feature_type": feature_type,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    record.update(extra)
    return record


__all__ = ["FORMAT", "to_explorer_json", "to_neuronpedia_json"]
