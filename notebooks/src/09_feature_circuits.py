# %% [markdown]
# # Feature circuits: attribution graphs over latents, attention edges included
#
# Transcoders and SAEs split a model's MLPs and attention outputs into sparse latents. A *feature
# graph* links the active latents of one prompt to each other, to the token and position
# embeddings, to each dictionary's reconstruction errors, to the model's constants and to a
# target (a logit, a logit difference, the salient logits), with one number per edge: the
# sender's exact contribution to the receiver's pre-activation in the *local replacement model*.
# That model replaces each dictionary's module by its latents (activations held at their real
# values, the error added as a constant), freezes the norm scales, and treats attention in one of
# three ways: frozen patterns (`attention="value"`, circuit-tracer's semantics) or the QK-aware
# splits (`"pattern"`, `"symmetric"`), where a latent that moves a head's pattern gets query and
# key edges. Here: the zoo's `ioi` model with its per-layer transcoders, and the attention-only
# `induction` model with its attention-output (`hook_z`) SAEs, whose mechanism runs through keys.

# %%
import json
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import pandas as pd
import plotly.graph_objects as go
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.features.lens import decoder_lens
from depass_lens.features.prune import graph_scores, prune
from depass_lens.features.report import run_feature_graph, zoo_examples
from depass_lens.features.sites import place_sites
from depass_lens.zoo.saes import dictionary_stats, load_dictionaries

torch.set_num_threads(1)
pd.set_option("display.width", 120)
KIND_COLOURS = {"value": "#4c78a8", "query": "#f58518", "key": "#54a24b"}

# %% [markdown]
# ## The model and its dictionaries
#
# `ioi` is a 3-layer GPT-2-style model. The zoo ships one TopK transcoder per MLP (512 latents,
# k = 16), reading `ln2.hook_normalized` and writing `hook_mlp_out`, in SAELens's folder format;
# `load_dictionaries` returns them in layer order (any SAELens `SAE`, circuit-tracer transcoder or
# duck-typed object with `W_enc`/`W_dec`/`b_enc`/`b_dec` works the same way).

# %%
model = zoo.load("ioi")
dictionaries = load_dictionaries("ioi")
rows = [
    {
        "dictionary": key,
        "reads": s["hook_in"],
        "writes": s["hook_out"],
        "latents": s["d_sae"],
        "k": s["k"],
        "L0": round(s["L0"], 2),
        "explained variance": round(s["explained_variance"], 4),
    }
    for key, s in dictionary_stats("ioi").items()
]
print(pd.DataFrame(rows).set_index("dictionary").to_string())

# %% [markdown]
# ## One graph, one call
#
# The prompt is the first held-out IOI prompt (the first prompt of circuit-tracer's parity
# fixture, `benchmarks/results/circuit_tracer_ioi.md`); the target is the logit difference
# between the indirect object and the subject. `attention="value"` freezes the patterns as
# circuit-tracer does; its other conventions, and what it leaves out, come below.

# %%
batch = zoo.task("ioi").batch(model, 1, split="test", seed=0)
tokens, corrupted = batch.tokens, batch.corrupted
answer, wrong = model.to_string(batch.answers[:1]), model.to_string(batch.wrong[:1])
print(model.to_string(tokens[0]), "->", answer, "vs", wrong)
depass = dp.DePass(model, progress=False)
target = dp.LogitDiff(answer, wrong)
graph = depass.feature_graph(tokens, target, dictionaries=dictionaries, attention="value")
print(graph)

# %% [markdown]
# Node names say what each node is: `L1.mlp[262]@4` is latent 262 of layer 1's transcoder at
# position 4, `L1.mlp.error@4` that transcoder's reconstruction error at position 4, `token@4` and
# `position@4` the two embeddings, `L2.mlp.b_dec` or `L0.attn.b_V` a constant. Rows of
# `graph.edges` are receivers (the target first, then every active latent), columns all nodes.

# %% [markdown]
# ## Exact, and checked
#
# Two numbers are computed independently for each receiver: its real pre-activation (or target
# value), from the model's own forward pass, and the sum of its incoming edges plus its own
# constant (`b_enc`, or the target's `b_U`), from gradients of the replacement model. They must
# agree; `check()` reports the largest relative gap over latents and over targets. With a
# dictionary's error as a node at every position and every bias as a node, they agree to float32
# rounding; `DePass(check=True)`, the default, raises if they do not. A path the replacement
# model misses (a position embedding, a bias, one head's OV; `tests/test_feature_graph.py`
# removes each) shows up here as a gap of the size of what that path carries.

# %%
print("largest relative gap:", {k: f"{v:.1e}" for k, v in graph.check().items()})
t = graph.targets[0]
print(
    f"target: real {float(graph.value[t]):.4f}; "
    f"sum of incoming edges + b_U {float(graph.incoming(t).sum() + graph.own[t]):.4f}"
)
latent = max(graph.receivers[1:].tolist(), key=lambda j: abs(float(graph.target_scores()[j])))
print(
    f"{graph.nodes[latent].name}: pre-activation {float(graph.value[latent]):.4f}; "
    f"incoming + b_enc {float(graph.incoming(latent).sum() + graph.own[latent]):.4f}"
)

# %% [markdown]
# ## Nodes and edges as tables
#
# `node_table()` lists every node with its activation, its pre-activation (receivers) and its
# *score*: its direct edge into the target. The senders' scores and `b_U` add up to the target. Each
# latent is labelled here with the tokens its decoder vector promotes (the decoder logit lens:
# `W_dec[i]` through the final norm's weight and `W_U`).

# %%
sites = place_sites(depass.adapter, dictionaries)
nodes = graph.node_table()
top = nodes[nodes.kind != "target"].sort_values("score", key=abs, ascending=False).head(8)
lens = decoder_lens(depass.adapter, sites, graph, top.index.tolist(), k=3)
top = top.assign(lens=[", ".join(t for t, _ in lens.get(i, [])) for i in top.index])
print(top[["name", "kind", "activation", "score", "lens"]].to_string(index=False))
total = nodes.score[nodes.kind != "target"].sum()
print(f"\nall senders: {total:.4f} + b_U {float(graph.own[t]):.4f}")

# %% [markdown]
# `edge_table()` lists every non-zero edge, largest first; with frozen attention every edge is a
# `value` edge (value, residual and MLP hops only).

# %%
edges = graph.edge_table()
print(f"{len(edges)} non-zero edges")
print(edges.head(8).to_string(index=False))

# %% [markdown]
# ## What circuit-tracer leaves out, as named nodes
#
# With circuit-tracer's conventions (`attention="value"`, latents at position 0 left out, the
# salient logits as centred-logit targets, `target="top_logits"`) every edge circuit-tracer 0.5.0
# computes on this model equals DePass's to 1.6e-7 of the largest edge
# (`tests/test_feature_parity.py`). circuit-tracer has nodes for latents, errors at positions
# 1 and later, and token embeddings only; the rest of each logit (position embeddings, biases and
# `b_dec`, the first position's MLP output) is not in its graph. Here it is, by kind.

# %%
tracer = depass.feature_graph(
    tokens, "top_logits", dictionaries=dictionaries, attention="value", zero_first_position=True
)
t = tracer.targets[0]
print(tracer.nodes[t].name, "p =", round(tracer.settings["target_probabilities"][0], 4))
table = tracer.node_table()
senders = table[table.kind != "target"]
in_tracer = senders.kind.isin(["latent", "token"]) | ((senders.kind == "error") & (senders.pos > 0))
by_kind = senders.groupby([in_tracer.map({True: "in circuit-tracer", False: "left out"}), "kind"])
summary = by_kind.score.sum().rename("share of the centred logit")
summary.loc[("left out", "b_U (target's own)")] = float(tracer.own[t])
print(summary.round(4).to_string())
print(f"centred logit {float(tracer.value[t]):.4f} = {summary.sum():.4f}")
print(f"left out: {summary['left out'].sum():.4f}")

# %% [markdown]
# A graph restricted to circuit-tracer's nodes fails DePass's own check: its rows no longer add
# up to the real values (the relative gaps are against each row's total edge magnitude).
# circuit-tracer's replacement and completeness scores, recomputed on that restriction, are the
# ones circuit-tracer reports for this prompt (0.9003 and 0.9704); on the full graph, where
# position embeddings and constants count as inputs, they are a little higher.

# %%
keep = torch.tensor(in_tracer.reindex(table.index, fill_value=True).tolist())
restricted = tracer.subgraph(keep)
r = restricted.targets[0]
missing = float(restricted.value[r] - restricted.incoming(r).sum() - restricted.own[r])
print(f"target: {missing:.4f} of {float(restricted.value[r]):.4f} not reached by any edge")
print("check on circuit-tracer's nodes:", {k: f"{v:.2f}" for k, v in restricted.check().items()})
for label, g in (("on circuit-tracer's nodes", restricted), ("on every node", tracer)):
    print(f"{label:>26}:", {k: round(v, 4) for k, v in graph_scores(g).items()})

# %% [markdown]
# ## Pruning and scores
#
# `prune(graph, node_threshold, edge_threshold)` is circuit-tracer's pruning: rank nodes by their
# *influence* on the targets (the target weight reaching them through absolute, row-normalised
# edges, each target weighted by its probability), keep the nodes holding `node_threshold` of it,
# then the edges holding `edge_threshold` of the influence-weighted edge mass, and drop latents
# and errors left without outgoing (latents: or incoming) edges. Inputs and targets always stay.
# `graph_scores` gives circuit-tracer's *replacement* score (the influence reaching inputs rather
# than errors) and *completeness* (each node's non-error share of its input, weighted by
# influence), with position embeddings and constants counted as inputs, and the exact *error
# share*: the signed fraction of the target that error nodes carry directly. Below, the graph with
# circuit-tracer's conventions at its default thresholds (0.8, 0.98) and two tighter ones.

# %%
rows = []
for node_threshold, edge_threshold in [(0.8, 0.98), (0.6, 0.9), (0.4, 0.8)]:
    pruned = prune(tracer, node_threshold, edge_threshold)
    kept = pruned.nodes
    rows.append(
        {
            "node threshold": node_threshold,
            "edge threshold": edge_threshold,
            "nodes kept": int(kept.sum()),
            "latents kept": sum(1 for n, k in zip(tracer.nodes, kept) if k and n.kind == "latent"),
            "edges kept": int(pruned.edges.sum()),
        }
    )
print(f"full graph: {len(tracer)} nodes, {int((tracer.edges != 0).sum())} non-zero edges")
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# ## Query and key edges: `attention="symmetric"`
#
# With a QK-aware split, a head's output is credited both for what its values carry and for the
# move of its pattern away from uniform (`docs/qk.md`), so an edge can run through a head's query
# or key. `edge_kinds=True` (the default) splits every edge into `value` (patterns held), `query`
# (at least one query-side pattern move, no key-side one) and `key` (at least one key-side move),
# at the cost of two more passes; `check()["kinds"]` says the parts add up to the edge.

# %%
symmetric = depass.feature_graph(tokens, target, dictionaries=dictionaries, attention="symmetric")
print(symmetric)
print("largest relative gap:", {k: f"{v:.1e}" for k, v in symmetric.check().items()})
mass = {k: float(v.abs().sum()) for k, v in symmetric.kind_edges.items()}
print(
    "share of |edge| mass by kind:", {k: round(v / sum(mass.values()), 3) for k, v in mass.items()}
)
print(symmetric.edge_table().head(8).to_string(index=False))

# %% [markdown]
# ## Induction: previous-token latents reach the induction output through keys
#
# `induction` is a 2-layer attention-only model. A layer-0 previous-token head (L0H1) writes
# "the token before me was X" into every position; layer-1 induction heads find, with their keys,
# the position whose previous token is the current one, and copy what sits there. The zoo ships
# TopK SAEs on `attn.hook_z` of both layers (256 latents each, heads flattened). Frozen attention
# cannot see the key step: a latent that only tells a head where to look has no value path into
# the answer.

# %%
ind_model = zoo.load("induction")
ind_dictionaries = load_dictionaries("induction")
ind_depass = dp.DePass(ind_model, progress=False)
prompt, ind_answer, ind_wrong = zoo.example("induction")
words = ind_model.to_str_tokens(prompt)
last = len(words) - 1
earlier = words.index(words[last])
key_pos = earlier + 1
print(prompt, "->", ind_answer)
print(
    f"the last token {words[last]!r} also sits at position {earlier}; the answer "
    f"{words[key_pos]!r} follows it at position {key_pos}, the key an induction head must find"
)
ind_target = dp.LogitDiff(ind_answer, ind_wrong)
ind_graph = ind_depass.feature_graph(
    prompt, ind_target, dictionaries=ind_dictionaries, attention="symmetric"
)
ind_frozen = ind_depass.feature_graph(
    prompt, ind_target, dictionaries=ind_dictionaries, attention="value"
)
print(ind_graph)
print("largest relative gap:", {k: f"{v:.1e}" for k, v in ind_graph.check().items()})

# %% [markdown]
# The strongest layer-1 latent at the last position (by its direct edge into the target), and its
# ten largest incoming edges with their value / query / key parts. For each layer-0 latent, its
# *L0H1 share*: the fraction of its decoder's squared norm on head 1's slice of `hook_z`, i.e.
# how much of what it writes is the previous-token head's. The frozen-attention graph's edge
# between the same two nodes is beside it.

# %%
scores = ind_graph.target_scores()
outputs = [
    j
    for j, n in enumerate(ind_graph.nodes)
    if n.site == "L1.z" and n.kind == "latent" and n.pos == last
]
strongest = max(outputs, key=lambda j: abs(float(scores[j])))
name = ind_graph.nodes[strongest].name
W_dec = ind_dictionaries[0].W_dec.detach()
per_head = W_dec.view(W_dec.shape[0], ind_model.cfg.n_heads, -1).norm(dim=-1) ** 2
l0h1_share = per_head[:, 1] / per_head.sum(-1)
incoming = ind_graph.incoming(name)
frozen = ind_frozen.incoming(ind_frozen.index(name))
rows = []
for j in incoming.abs().argsort(descending=True)[:10].tolist():
    node = ind_graph.nodes[j]
    rows.append(
        {
            "source": node.name,
            "edge": float(incoming[j]),
            **{k: float(ind_graph.incoming(name, kind=k)[j]) for k in ("value", "query", "key")},
            "L0H1 share": float(l0h1_share[node.index])
            if node.site == "L0.z" and node.kind == "latent"
            else float("nan"),
            "frozen-attention edge": float(frozen[ind_frozen.index(node.name)]),
        }
    )
top_in = pd.DataFrame(rows)
activation, score = float(ind_graph.activation[strongest]), float(scores[strongest])
print(f"{name}: activation {activation:.3f}, direct edge into the target {score:.3f}")
print(top_in.round(3).to_string(index=False))

# %%
fig = go.Figure()
for kind, colour in KIND_COLOURS.items():
    fig.add_bar(y=top_in.source, x=top_in[kind], name=kind, orientation="h", marker_color=colour)
fig.add_scatter(
    y=top_in.source,
    x=top_in["frozen-attention edge"],
    mode="markers",
    name='attention="value"',
    marker={"symbol": "x", "color": "black", "size": 9},
)
fig.update_layout(
    barmode="relative",
    title=f"Top edges into {name}, by kind (bars) and with frozen attention (x)",
    xaxis_title="edge (contribution to the pre-activation)",
    yaxis={"autorange": "reversed"},
    height=380,
    template="plotly_white",
)
fig.show()

# %% [markdown]
# The edges split the mechanism into its parts. The value edges from position 11 (a layer-0
# latent written by other heads, and the token embedding) are what the induction head copies;
# the current token's embedding reaches it through the query (what to look for); and the layer-0
# latents at position 11 written mostly by the previous-token head L0H1 reach it through the key
# (where to look). Summed over every such latent (L0H1 share > 0.5) at the key position: a sizeable
# part of the latent's pre-activation by keys, while with frozen patterns the same latents' edges
# are small and of the other sign, and the frozen graph has no key part at all.

# %%
previous = [
    j
    for j, n in enumerate(ind_graph.nodes)
    if n.kind == "latent"
    and n.site == "L0.z"
    and n.pos == key_pos
    and float(l0h1_share[n.index]) > 0.5
]
key_part = ind_graph.incoming(name, kind="key")
print(
    f"{len(previous)} previous-token latents at position {key_pos}:",
    [ind_graph.nodes[j].name for j in previous],
)
print(f"their key edges into {name}: {float(key_part[previous].sum()):+.3f}")
print(f"their edges into it with frozen attention: {float(frozen[previous].sum()):+.3f}")
print(f"pre-activation of {name}: {float(ind_graph.value[strongest]):.3f}")
print("edge kinds of the frozen graph:", sorted(ind_frozen.kind_edges))

# %% [markdown]
# ## A contrastive graph
#
# `contrast=` explains a change: clean minus corrupted (here the IOI prompt with its second
# subject replaced), with the difference linearisation (every nonlinearity is its exact secant
# between the two runs). Latents active in either run are nodes, scored by their change, so a
# latent that fires only on the corrupted prompt (activation 0 here) can matter; each receiver's
# edges add up to its pre-activation's change, and the sources to the target's change.

# %%
print(model.to_string(corrupted[0]))
contrast = depass.feature_graph(tokens, target, dictionaries=dictionaries, contrast=corrupted)
print(contrast)
print("largest relative gap:", {k: f"{v:.1e}" for k, v in contrast.check().items()})
with torch.no_grad():
    change = model(tokens)[0, -1] - model(corrupted)[0, -1]
expected = float(change[batch.answers[0]] - change[batch.wrong[0]])
explained = float(contrast.value[contrast.targets[0]])
print(f"change of {answer} - {wrong}: model {expected:.4f}, graph {explained:.4f}")
changed = contrast.node_table()
changed = changed[changed.kind != "target"].sort_values("score", key=abs, ascending=False)
print(changed.head(8)[["name", "kind", "activation", "score"]].round(3).to_string(index=False))

# %% [markdown]
# ## The explorer page
#
# `run_feature_graph` builds the graph, prunes it, adds each kept latent's decoder logit lens and
# (for zoo dictionaries) its top-activating held-out prompts, and writes a self-contained HTML page
# (no network needed) and, optionally, the graph JSON and circuit-tracer / Neuronpedia graph JSON.
# The command line does the same: `depass-lens feature-graph --model induction --out graph.html`.
# Open the page in any browser (`python -m webbrowser graph.html`, or double-click it): layers by
# positions, nodes coloured by score and sized by influence; click a node to list its incoming and
# outgoing edges, filter edge kinds, pin nodes, group them into supernodes, export the subgraph.

# %%
out = Path(tempfile.mkdtemp())
ind_sites = place_sites(ind_depass.adapter, ind_dictionaries)
report = run_feature_graph(
    ind_depass,
    prompt,
    ind_target,
    ind_dictionaries,
    out / "induction.html",
    attention="symmetric",
    model_name="induction",
    examples=zoo_examples("induction", {s.layer: s.name for s in ind_sites}),
    json_out=out / "induction.json",
    neuronpedia_out=out / "induction.neuronpedia.json",
)
for line in report.summary().splitlines()[1:]:
    if not line.startswith("wrote"):
        print(line)
for path in report.written:
    print(f"wrote {path.name} ({path.stat().st_size // 1024} kB)")

# %% [markdown]
# ## Export to circuit-tracer's and Neuronpedia's graph JSON
#
# The pruned graph in circuit-tracer's `create_graph_files` format (`metadata`, `qParams`, `nodes`,
# `links`; node ids and feature numbers in its scheme), which its local server and Neuronpedia's
# graph viewer load. Latents become transcoder features, errors reconstruction-error nodes; the
# nodes that format has no type for (position embeddings, constants) are listed with the share of
# the target each carries under `metadata.depass_nodes_left_out`. Edges are the total weights:
# that format has no edge kinds, and it has no type for attention-output latents either, so the
# `hook_z` latents here are written as transcoder features (the ids keep their layer and index).
# `depass_lens.features.export.to_neuronpedia_json(graph, pruned, token_ids, slug=..., scan=...)`
# does the same from a graph in hand.

# %%
exported = json.loads((out / "induction.neuronpedia.json").read_text())
types = pd.Series([n["feature_type"] for n in exported["nodes"]]).value_counts()
print(types.to_string())
print(len(exported["links"]), "links")
left_out = exported["metadata"]["depass_nodes_left_out"]
print(
    "left out:",
    {k: round(v, 3) for k, v in sorted(left_out.items(), key=lambda kv: -abs(kv[1]))[:5]},
)

# %% [markdown]
# ## Cost and faithfulness
#
# On `ioi` (15 tokens, one thread) a value graph costs about 13x one `run_with_cache`, the
# symmetric graph 25x without edge kinds and 66x with them; circuit-tracer takes about 55x on the
# same model and transcoders (`docs/features.md`). Whether the graphs' top nodes are the ones
# that matter when ablated or patched, for each attention treatment against frozen-attention
# graphs, attribution patching and integrated gradients on latents, is measured in
# `docs/faithfulness.md`.
