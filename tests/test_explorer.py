"""The feature-graph explorer: one self-contained HTML page, checked in a real headless Chromium.

A synthetic graph (every node kind, every edge kind, several kinds on one node pair, a prompt that
tries to close the script element) is written with ``write_explorer`` and opened through
Playwright. The browser tests need the ``playwright`` package (the dev extra) and a ``chromium``
executable (scripts/test.sh installs Debian's); without them they skip, saying which is missing,
except under CI (``CI=true``) where a skip would hide a broken page, so they fail instead.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest

from depass_lens.errors import DePassInputError
from depass_lens.explorer import EDGE_KINDS, FORMAT, explorer_html, write_explorer

HOSTILE_PROMPT = 'When Mary and John went </script><script>alert("x")</script> <!-- & to'


def synthetic_graph(n_positions: int = 8, latents_per_cell: int = 1, seed: int = 0) -> dict:
    """A small feature graph in the viewer's format: embeddings, latents, errors, constants, a
    target, and edges of every kind (some node pairs with several kinds)."""
    rng = random.Random(seed)
    tokens = ["<bos>", "When", " Mary", " and", " John", " went", "</script>", " to"]
    tokens = (tokens * (n_positions // len(tokens) + 1))[:n_positions]
    layers = ["embed", "L0", "L1", "L2", "target"]
    nodes: list[dict] = []

    def add(**node) -> int:
        node.setdefault("pos", None)
        nodes.append(node)
        return len(nodes) - 1

    emb, latents, errors, consts = [], [], [], []
    for pos, tok in enumerate(tokens):
        emb.append(
            add(id=f"tok@{pos}", kind="token", row=0, pos=pos, label=repr(tok), score=0.1 * pos)
        )
        if pos % 3 == 0:
            emb.append(add(id=f"pos@{pos}", kind="position", row=0, pos=pos, score=-0.05))
    for layer in range(3):
        site = f"L{layer}.transcoder"
        for pos in range(1, n_positions):
            if (pos + layer) % 2 and latents_per_cell == 1:
                continue
            for k in range(latents_per_cell):
                index = 7 * layer + pos + 100 * k
                latents.append(
                    add(
                        id=f"L{layer}.tc[{index}]@{pos}",
                        kind="latent",
                        row=layer + 1,
                        pos=pos,
                        site=site,
                        index=index,
                        activation=round(rng.uniform(0.1, 4), 3),
                        score=round(rng.uniform(-1, 1), 3),
                        influence=round(rng.uniform(0, 0.5), 3),
                        label=f"latent {index}",
                        lens=[[" Mary", 3.1], [" John", -2.0], [" went", 0.5]],
                        top_prompts=[
                            {
                                "text": "Then Mary <b>and</b> John",
                                "pos": 2,
                                "token": " Mary",
                                "activation": 3.2,
                            },
                        ],
                    )
                )
        errors.append(
            add(
                id=f"L{layer}.err@{n_positions - 1}",
                kind="error",
                row=layer + 1,
                pos=n_positions - 1,
                site=site,
                score=0.07,
                influence=0.02,
            )
        )
        consts.append(add(id=f"L{layer}.b_dec", kind="constant", row=layer + 1, score=0.01))
    target = add(
        id="target", kind="target", row=4, pos=n_positions - 1, score=4.65, label="logit diff"
    )

    def row(i: int) -> int:
        return nodes[i]["row"]

    edges: list[list] = []

    def w() -> float:
        return round(rng.choice([-1, 1]) * rng.uniform(0.01, 1.0), 4)

    sources = emb + latents + errors + consts
    for t in latents + errors + [target]:
        for s in sources:
            if row(s) >= row(t) or rng.random() > 0.35:
                continue
            same = nodes[s]["pos"] == nodes[t]["pos"]
            if t == target:
                kinds = ["direct"]
            elif nodes[s]["kind"] == "latent" and same:
                kinds = ["mlp"]
            elif same or nodes[s]["pos"] is None:
                kinds = ["direct"]
            else:
                kinds = rng.sample(["value", "query", "key"], rng.randint(1, 3))
            edges.extend([s, t, kind, w()] for kind in kinds)
    return {
        "format": FORMAT,
        "model": "ioi",
        "prompt": HOSTILE_PROMPT,
        "tokens": tokens,
        "target": {"name": "logit diff ' Mary' - ' John'", "value": 4.65},
        "attention": "symmetric",
        "layers": layers,
        "nodes": nodes,
        "edges": edges,
        "scores": {"replacement": 0.9, "completeness": 0.97, "error_share": 0.08},
        "pruning": {"node_threshold": 0.8, "edge_threshold": 0.98},
    }


def big_graph(n_nodes: int = 2000, n_edges: int = 50_000, n_positions: int = 24) -> dict:
    """The size the page must stay usable at: 2,000 nodes, 50,000 edge records."""
    rng = random.Random(1)
    layers = ["embed"] + [f"L{i}" for i in range(6)] + ["target"]
    tokens = [f" t{i}" for i in range(n_positions)]
    nodes = [
        {"id": f"tok@{p}", "kind": "token", "row": 0, "pos": p, "score": 0.1}
        for p in range(n_positions)
    ]
    while len(nodes) < n_nodes - 1:
        r, p, k = rng.randint(1, 6), rng.randrange(n_positions), len(nodes)
        nodes.append(
            {
                "id": f"L{r - 1}.tc[{k}]@{p}",
                "kind": "latent",
                "row": r,
                "pos": p,
                "score": rng.uniform(-1, 1),
                "influence": rng.uniform(0, 1),
            }
        )
    nodes.append({"id": "target", "kind": "target", "row": 7, "pos": n_positions - 1})
    edges = []
    while len(edges) < n_edges:
        s, t = rng.randrange(n_nodes), rng.randrange(n_nodes)
        if nodes[s]["row"] < nodes[t]["row"]:
            edges.append([s, t, rng.choice(EDGE_KINDS), rng.uniform(-1, 1)])
    return {"format": FORMAT, "tokens": tokens, "layers": layers, "nodes": nodes, "edges": edges}


# ---- the page in Python -------------------------------------------------------------------------


def test_page_is_self_contained_and_escapes_the_data():
    graph = synthetic_graph()
    page = explorer_html(graph)
    assert not re.search(r"https?:", page, re.IGNORECASE), "the page names a network URL"
    assert not re.search(r"<(script|img|iframe|link|embed|object)\b[^>]*\b(src|href)\s*=", page)
    assert "@import" not in page and "<link" not in page
    # Only the page's own two script elements end: the prompt's and token's "</script>" do not.
    assert page.count("</script>") == 2 and page.count("<script") == 2
    assert "<!--" not in page
    embedded = re.search(
        r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S
    )
    assert embedded is not None
    assert json.loads(embedded.group(1)) == graph


def test_write_explorer_returns_the_path(tmp_path):
    path = write_explorer(synthetic_graph(), tmp_path / "sub" / "graph.html")
    assert path == tmp_path / "sub" / "graph.html" and path.read_text("utf-8").startswith(
        "<!DOCTYPE html>"
    )


def _broken(change) -> dict:
    graph = synthetic_graph()
    change(graph)
    return graph


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g.pop("nodes"), "required field 'nodes' is missing"),
        (lambda g: g.update(format="circuit-tracer"), "this viewer reads"),
        (lambda g: g["edges"].append([0, 10_000, "value", 1.0]), "edge .* target 10000"),
        (lambda g: g["edges"].append([-1, 0, "value", 1.0]), "edge .* source -1"),
        (lambda g: g["edges"].append([0, 1, "ov", 1.0]), "kind 'ov'"),
        (lambda g: g["edges"].append([0, 1, "value", math.nan]), "finite number"),
        (lambda g: g["edges"].append([0, 1, "value"]), r"\[source, target, kind, weight\]"),
        (lambda g: g["nodes"][3].update(id=g["nodes"][0]["id"]), "unique"),
        (lambda g: g["nodes"][3].update(kind="head"), "kind 'head'"),
        (lambda g: g["nodes"][3].update(row=9), "row 9"),
        (lambda g: g["nodes"][3].update(pos=99), "pos 99"),
        (lambda g: g["nodes"][3].pop("id"), "no 'id'"),
        (lambda g: g["nodes"][3].update(influence=-1), "influence"),
        (lambda g: g["nodes"][3].update(lens=[["a"]]), "lens entry"),
        (lambda g: g.update(attention="frozen"), "attention"),
        (lambda g: g.update(tokens="abc"), "'tokens' must be a list"),
    ],
)
def test_bad_graph_is_refused_clearly(change, message):
    with pytest.raises(DePassInputError, match=message):
        explorer_html(_broken(change))


# ---- the page in a browser ----------------------------------------------------------------------


def _chromium_or_reason() -> tuple[str | None, str | None]:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "the playwright package is not installed (dev extra: playwright==1.63.0)"
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found, None
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium", None
    return None, "no chromium executable on PATH (apt-get install chromium)"


@pytest.fixture(scope="module")
def browser():
    executable, reason = _chromium_or_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the explorer's browser tests, but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, tmp_path):
    opened = []

    def _open(graph: dict, name: str = "graph.html"):
        path = write_explorer(graph, tmp_path / name)
        context = browser.new_context(
            viewport={"width": 1400, "height": 900}, accept_downloads=True
        )
        page = context.new_page()
        page.requests = []
        page.errors = []
        page.on("request", lambda request: page.requests.append(request.url))
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on(
            "console",
            lambda message: page.errors.append(message.text) if message.type == "error" else None,
        )
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready=true]")
        opened.append(context)
        return page

    yield _open
    for context in opened:
        context.close()


def _node(page, node_id: str):
    return page.locator(f'#graph circle[data-node-id="{node_id}"]')


def _listed(page, list_id: str) -> list[tuple[str, str, float]]:
    """(other node's id, kind, weight) for each edge the panel lists, in order, checking that the
    visible text agrees with the data attributes."""
    rows = page.eval_on_selector_all(
        f"#{list_id} li.edge-item",
        """items => items.map(li => [li.dataset.nodeId, li.dataset.kind, li.dataset.weight,
            li.querySelector('.edge-name').textContent,
            li.querySelector('.kind-badge').textContent,
            li.querySelector('.edge-weight').textContent])""",
    )
    out = []
    for node_id, kind, weight, name_text, kind_text, weight_text in rows:
        assert name_text == node_id and kind_text == kind
        assert float(weight_text) == pytest.approx(float(weight), rel=5e-3, abs=1e-12)
        out.append((node_id, kind, float(weight)))
    return out


def _expected(graph: dict, node: int, direction: str, kinds=EDGE_KINDS):
    ids = [n["id"] for n in graph["nodes"]]
    if direction == "in":
        return [(ids[s], k, w) for s, t, k, w in graph["edges"] if t == node and k in kinds]
    return [(ids[t], k, w) for s, t, k, w in graph["edges"] if s == node and k in kinds]


def _busiest(graph: dict) -> int:
    """A node with both incoming and outgoing edges and as many edge kinds as possible."""
    kinds: dict[int, set] = defaultdict(set)
    has_in, has_out = set(), set()
    for s, t, k, _ in graph["edges"]:
        kinds[s].add(k)
        kinds[t].add(k)
        has_out.add(s)
        has_in.add(t)
    both = has_in & has_out
    return max(both, key=lambda n: (len(kinds[n]), n))


def _sorted(rows):
    return sorted(rows, key=lambda r: (r[0], r[1], r[2]))


def test_page_draws_every_node_and_reaches_no_network(open_page):
    graph = synthetic_graph()
    page = open_page(graph)
    ids = page.eval_on_selector_all(
        "[data-testid=graph-node]", "els => els.map(e => e.dataset.nodeId)"
    )
    assert sorted(ids) == sorted(n["id"] for n in graph["nodes"])
    assert page.evaluate("window.depassExplorer.data") == graph  # the hostile prompt survived
    assert page.title().startswith("DePass feature graph")
    assert page.inner_text("[data-testid=prompt]").strip().endswith(HOSTILE_PROMPT)
    assert page.locator("#col-labels text.col-token").count() == len(graph["tokens"]) + 1
    first = graph["nodes"][0]["id"]
    _node(page, first).hover()
    assert page.locator("[data-testid=tooltip]").is_visible()
    assert first in page.inner_text("[data-testid=tooltip]")
    assert all(url.startswith(("file:", "data:", "blob:")) for url in page.requests), page.requests
    assert page.errors == []


def test_clicked_node_lists_exactly_its_edges_and_kinds_filter_them(open_page):
    graph = synthetic_graph()
    page = open_page(graph)
    n = _busiest(graph)
    node_id = graph["nodes"][n]["id"]
    _node(page, node_id).click()
    assert page.inner_text("[data-testid=node-title]") == node_id
    incoming, outgoing = _listed(page, "incoming-edges"), _listed(page, "outgoing-edges")
    assert _sorted(incoming) == _sorted(_expected(graph, n, "in"))
    assert _sorted(outgoing) == _sorted(_expected(graph, n, "out"))
    for rows in (incoming, outgoing):  # strongest first
        assert [abs(w) for *_, w in rows] == sorted((abs(w) for *_, w in rows), reverse=True)
    drawn = page.locator("#layer-edges path.edge").count()
    assert drawn == len(incoming) + len(outgoing)

    present = {k for _, k, _ in incoming + outgoing}
    assert len(present) >= 2
    dropped = sorted(present)[0]
    page.click(f"[data-testid=kind-filter-{dropped}]")
    kept = [k for k in EDGE_KINDS if k != dropped]
    incoming_f, outgoing_f = _listed(page, "incoming-edges"), _listed(page, "outgoing-edges")
    assert _sorted(incoming_f) == _sorted(_expected(graph, n, "in", kept))
    assert _sorted(outgoing_f) == _sorted(_expected(graph, n, "out", kept))
    assert all(k != dropped for _, k, _ in incoming_f + outgoing_f)
    assert page.locator(f"#layer-edges path.edge-{dropped}").count() == 0
    assert page.locator("#layer-edges path.edge").count() == len(incoming_f) + len(outgoing_f)
    page.click(f"[data-testid=kind-filter-{dropped}]")
    assert _sorted(_listed(page, "incoming-edges")) == _sorted(incoming)

    # A listed edge jumps to the node at its other end.
    other = page.locator("#incoming-edges li.edge-item").first
    other_id = other.get_attribute("data-node-id")
    other.click()
    assert page.inner_text("[data-testid=node-title]") == other_id
    assert page.locator(f'#graph circle.selected[data-node-id="{other_id}"]').count() == 1

    # The search box finds a node by name; Enter selects it.
    page.fill("[data-testid=search-input]", node_id)
    assert page.locator(f'[data-testid=search-result][data-node-id="{node_id}"]').count() == 1
    page.press("[data-testid=search-input]", "Enter")
    assert page.inner_text("[data-testid=node-title]") == node_id
    assert page.errors == []


def test_pin_group_and_export_the_subgraph(open_page, tmp_path):
    graph = synthetic_graph()
    page = open_page(graph)
    ids = [x["id"] for x in graph["nodes"]]
    # Two nodes joined by an edge, and a third node feeding the second.
    s, t = next((s, t) for s, t, _, _ in graph["edges"] if graph["nodes"][s]["kind"] == "latent")
    u = next(a for a, b, _, _ in graph["edges"] if b == t and a != s)
    for node in (s, t):
        _node(page, ids[node]).click()
        page.click("[data-testid=pin-button]")
        assert page.inner_text("[data-testid=pin-button]") == "Unpin"
    assert page.eval_on_selector_all(
        "[data-testid=pinned-item]", "els => els.map(e => e.dataset.nodeId)"
    ) == [ids[s], ids[t]]

    with page.expect_download() as download:
        page.click("[data-testid=export-button]")
    exported = json.loads(page.input_value("[data-testid=export-json]"))
    saved = download.value.path()
    assert json.loads(Path(saved).read_text("utf-8")) == exported
    assert download.value.suggested_filename == "subgraph.json"
    assert exported["format"] == "depass_lens.feature_subgraph/1"
    assert [x["id"] for x in exported["nodes"]] == [ids[s], ids[t]]
    assert exported["nodes"][0] == graph["nodes"][s]
    among = [[ids[a], ids[b], k, w] for a, b, k, w in graph["edges"] if {a, b} <= {s, t}]
    assert _sorted(exported["edges"]) == _sorted(among) and among
    assert exported["supernodes"] == []

    # A third node, then s and t grouped into a supernode: its edges are summed per kind.
    _node(page, ids[u]).click()
    page.keyboard.press("p")
    page.locator(f'[data-testid=pinned-item][data-node-id="{ids[s]}"] input').check()
    page.locator(f'[data-testid=pinned-item][data-node-id="{ids[t]}"] input').check()
    page.fill("[data-testid=group-name]", "pair")
    page.click("[data-testid=group-button]")
    assert page.locator("[data-testid=supernode-item]").count() == 1
    page.click("[data-testid=export-button]")
    exported = json.loads(page.input_value("[data-testid=export-json]"))
    assert exported["supernodes"] == [{"name": "pair", "members": [ids[s], ids[t]]}]
    sums: dict[tuple, float] = defaultdict(float)
    for a, b, k, w in graph["edges"]:
        if {a, b} <= {s, t, u}:
            ua = "pair" if a in (s, t) else ids[a]
            ub = "pair" if b in (s, t) else ids[b]
            if ua == ub == "pair":
                continue
            sums[(ua, ub, k)] += w
    got = {(a, b, k): w for a, b, k, w in exported["supernode_edges"]}
    assert got.keys() == sums.keys() and any("pair" in key for key in got)
    assert all(got[key] == pytest.approx(value) for key, value in sums.items())
    assert page.locator("#layer-supernodes .group-mark").count() == 1
    assert page.errors == []


def test_two_thousand_nodes_fifty_thousand_edges(open_page):
    graph = big_graph()
    start = time.perf_counter()
    page = open_page(graph, "big.html")
    loaded = time.perf_counter() - start
    assert page.locator("[data-testid=graph-node]").count() == 2000
    degree: dict[int, int] = defaultdict(int)
    for s, t, _, _ in graph["edges"]:
        degree[s] += 1
        degree[t] += 1
    n = max(degree, key=lambda k: (degree[k], k))
    start = time.perf_counter()
    _node(page, graph["nodes"][n]["id"]).click()
    page.wait_for_selector("[data-testid=node-title]")
    clicked = time.perf_counter() - start
    n_in = sum(1 for _, t, _, _ in graph["edges"] if t == n)
    n_out = sum(1 for s, _, _, _ in graph["edges"] if s == n)
    assert page.inner_text("[data-testid=incoming-count]") == str(n_in)
    assert page.inner_text("[data-testid=outgoing-count]") == str(n_out)
    # Long lists are cut to the strongest 100 with a "show all" button.
    assert page.locator("#incoming-edges li.edge-item").count() == min(n_in, 100)
    # Generous bounds (a slow shared CI machine): the point is no quadratic blow-up.
    assert loaded < 30 and clicked < 10, (loaded, clicked)
    assert page.errors == []


def test_copy_of_graph_is_not_modified():
    graph = synthetic_graph()
    before = copy.deepcopy(graph)
    explorer_html(graph)
    assert graph == before
