"""Build the feature-graph explorer: validate the graph JSON, inline it with the page's assets.

The page is one HTML file with its script, style and data inline (no CDN, no network, no other
file), so it can be mailed, archived or opened from a laptop offline. The graph is embedded in a
``<script type="application/json">`` element; every ``<``, ``>`` and ``&`` in it is written as a
JSON ``\\u`` escape, so a prompt containing ``</script>`` or ``<!--`` cannot end the element.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from depass_lens.errors import DePassInputError

#: The graph format this viewer reads.
FORMAT = "depass_lens.feature_graph/1"
#: Node kinds the page knows how to draw.
NODE_KINDS = ("token", "position", "latent", "error", "constant", "target")
#: Edge kinds; an edge record is one kind's part of the (source, target) total.
EDGE_KINDS = ("value", "query", "key", "mlp", "direct")
#: Attention treatments a graph may name (see the design's section 13).
ATTENTION_MODES = ("value", "pattern", "symmetric", "contrast")

_PLACEHOLDER = re.compile(r"/\*__(CSS|JS|DATA|TITLE)__\*/")


def explorer_html(graph: Mapping[str, Any]) -> str:
    """The explorer page for ``graph`` as one self-contained HTML string.

    Raises :class:`~depass_lens.errors.DePassInputError` naming the first problem when ``graph`` is
    not a valid ``depass_lens.feature_graph/1`` document.
    """
    validate_graph(graph)
    data = _embed_json(graph)
    title = "DePass feature graph"
    if graph.get("model"):
        title += f" · {graph['model']}"
    target = graph.get("target")
    if isinstance(target, Mapping) and target.get("name"):
        title += f" · {target['name']}"
    parts = {
        "CSS": _asset("explorer.css"),
        "JS": _asset("explorer.js"),
        "DATA": data,
        "TITLE": html.escape(title),
    }
    # One pass: text substituted in (the graph's prompts above all) is never scanned again.
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _asset("template.html"))


def write_explorer(graph: Mapping[str, Any], path: str | Path) -> Path:
    """Write the explorer page for ``graph`` to ``path`` (parents created); return the path."""
    path = Path(path)
    page = explorer_html(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def validate_graph(graph: Mapping[str, Any]) -> None:
    """Check that ``graph`` is a ``depass_lens.feature_graph/1`` document the page can draw.

    Checks the required fields and their types, that node ids are unique, rows and positions are
    in range, every edge's endpoints are node indices, its kind is known and its weight finite.
    Raises :class:`~depass_lens.errors.DePassInputError` naming the first problem found.
    """
    if not isinstance(graph, Mapping):
        raise DePassInputError(
            f"feature graph: expected a JSON object (a mapping), got {type(graph).__name__}"
        )
    for key in ("format", "tokens", "layers", "nodes", "edges"):
        if key not in graph:
            raise DePassInputError(f"feature graph: required field {key!r} is missing")
    if graph["format"] != FORMAT:
        raise DePassInputError(
            f"feature graph: format is {graph['format']!r}; this viewer reads {FORMAT!r}"
        )
    tokens = _list_of(graph["tokens"], str, "tokens", "strings")
    layers = _list_of(graph["layers"], str, "layers", "strings")
    if not layers:
        raise DePassInputError("feature graph: 'layers' is empty; the page needs at least one row")
    attention = graph.get("attention")
    if attention is not None and attention not in ATTENTION_MODES:
        raise DePassInputError(
            f"feature graph: attention is {attention!r}; expected one of {ATTENTION_MODES}"
        )
    for key in ("model", "prompt"):
        if graph.get(key) is not None and not isinstance(graph[key], str):
            raise DePassInputError(f"feature graph: {key!r} must be a string")
    target = graph.get("target")
    if target is not None:
        if not isinstance(target, Mapping):
            raise DePassInputError("feature graph: 'target' must be an object {name, value}")
        _optional_number(target, "value", "target")
    for key in ("scores", "pruning"):
        block = graph.get(key)
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise DePassInputError(f"feature graph: {key!r} must be an object of numbers")
        for name in block:
            _optional_number(block, name, key)

    nodes = graph["nodes"]
    if not isinstance(nodes, Sequence) or isinstance(nodes, str):
        raise DePassInputError("feature graph: 'nodes' must be a list of node objects")
    seen: dict[str, int] = {}
    for i, node in enumerate(nodes):
        _check_node(node, i, len(tokens), len(layers))
        if node["id"] in seen:
            raise DePassInputError(
                f"feature graph: node {i} repeats the id {node['id']!r} of node {seen[node['id']]};"
                " node ids must be unique"
            )
        seen[node["id"]] = i

    edges = graph["edges"]
    if not isinstance(edges, Sequence) or isinstance(edges, str):
        raise DePassInputError(
            "feature graph: 'edges' must be a list of [source, target, kind, weight] records"
        )
    n = len(nodes)
    for i, edge in enumerate(edges):
        if not isinstance(edge, Sequence) or isinstance(edge, str) or len(edge) != 4:
            raise DePassInputError(
                f"feature graph: edge {i} is {edge!r}; expected [source, target, kind, weight]"
            )
        source, target_index, kind, weight = edge
        for role, index in (("source", source), ("target", target_index)):
            if not _is_int(index) or not 0 <= index < n:
                raise DePassInputError(
                    f"feature graph: edge {i} has {role} {index!r}; it must be a node index"
                    f" in [0, {n})"
                )
        if kind not in EDGE_KINDS:
            raise DePassInputError(
                f"feature graph: edge {i} has kind {kind!r}; expected one of {EDGE_KINDS}"
            )
        if not _is_finite(weight):
            raise DePassInputError(
                f"feature graph: edge {i} has weight {weight!r}; it must be a finite number"
            )


def _check_node(node: Any, i: int, n_positions: int, n_rows: int) -> None:
    where = f"feature graph: node {i}"
    if not isinstance(node, Mapping):
        raise DePassInputError(f"{where} is {type(node).__name__}; expected an object")
    for key in ("id", "kind", "row"):
        if key not in node:
            raise DePassInputError(f"{where} has no {key!r}")
    if not isinstance(node["id"], str) or not node["id"]:
        raise DePassInputError(f"{where}: id must be a non-empty string, got {node['id']!r}")
    where = f"feature graph: node {i} ({node['id']!r})"
    if node["kind"] not in NODE_KINDS:
        raise DePassInputError(f"{where} has kind {node['kind']!r}; expected one of {NODE_KINDS}")
    if not _is_int(node["row"]) or not 0 <= node["row"] < n_rows:
        raise DePassInputError(
            f"{where} has row {node['row']!r}; it must index 'layers' (0 to {n_rows - 1})"
        )
    pos = node.get("pos")
    if pos is not None and (not _is_int(pos) or not 0 <= pos < n_positions):
        raise DePassInputError(
            f"{where} has pos {pos!r}; it must index 'tokens' (0 to {n_positions - 1}) or be null"
        )
    for key in ("activation", "score", "influence"):
        _optional_number(node, key, where)
    if node.get("influence") is not None and node["influence"] < 0:
        raise DePassInputError(f"{where} has influence {node['influence']!r}; it must be >= 0")
    for key in ("site", "label"):
        if node.get(key) is not None and not isinstance(node[key], str):
            raise DePassInputError(f"{where}: {key!r} must be a string")
    if node.get("index") is not None and not _is_int(node["index"]):
        raise DePassInputError(f"{where}: 'index' must be an integer")
    lens = node.get("lens")
    if lens is not None:
        if not isinstance(lens, Sequence) or isinstance(lens, str):
            raise DePassInputError(f"{where}: 'lens' must be a list of [token, value] pairs")
        for entry in lens:
            if (
                not isinstance(entry, Sequence)
                or isinstance(entry, str)
                or len(entry) != 2
                or not isinstance(entry[0], str)
                or not _is_finite(entry[1])
            ):
                raise DePassInputError(
                    f"{where}: lens entry {entry!r} is not a [token, finite number] pair"
                )
    prompts = node.get("top_prompts")
    if prompts is not None:
        if not isinstance(prompts, Sequence) or isinstance(prompts, str):
            raise DePassInputError(f"{where}: 'top_prompts' must be a list of objects")
        for entry in prompts:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("text"), str):
                raise DePassInputError(
                    f"{where}: top_prompts entry {entry!r} needs a 'text' string"
                )
            _optional_number(entry, "activation", f"{where}: top_prompts entry")


def _list_of(value: Any, kind: type, name: str, what: str) -> list:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(isinstance(v, kind) for v in value)
    ):
        raise DePassInputError(f"feature graph: {name!r} must be a list of {what}")
    return list(value)


def _optional_number(block: Mapping[str, Any], key: str, where: str) -> None:
    value = block.get(key)
    if value is not None and not _is_finite(value):
        raise DePassInputError(f"{where}: {key!r} is {value!r}; it must be a finite number")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _embed_json(graph: Mapping[str, Any]) -> str:
    """``graph`` as JSON safe inside a script element (no ``<``, ``>``, ``&`` as such)."""
    try:
        text = json.dumps(
            graph, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain
        )
    except (TypeError, ValueError) as error:  # NaN or an object in a field the page only shows
        raise DePassInputError(f"feature graph: cannot be written as JSON: {error}") from error
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _plain(value: Any) -> Any:
    """JSON for the containers and scalars ``json`` does not take as they are (numpy, mappings)."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Sequence | set | frozenset) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"feature graph: {type(value).__name__} is not JSON serialisable")


def _asset(name: str) -> str:
    return resources.files("depass_lens.explorer").joinpath(name).read_text(encoding="utf-8")
