# %% [markdown]
# # Circuits: exact edge attribution on every zoo model
#
# Node scores say which heads matter; a circuit says how they feed each other. `DePass.graph`
# scores every edge — a sender's output read by a head's query, key or value, by an MLP, or by
# the logits — with its exact share of the target, from one forward and one backward pass, and
# the shares are conserved at every node. Here we find the circuit of each zoo model end to end,
# check it by edge patching, compare DePass with EAP, EAP-IG and ACDC on the same harness, and
# name the edges found against each model's known mechanism (established independently by path
# patching, `zoo.mechanism`).

# %%
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import pandas as pd
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.adapters.loading import tl_generation
from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric
from depass_lens.evaluation.circuit_faithfulness import CircuitCurve, figure

torch.set_num_threads(1)
MODELS = ["ioi", "induction", "recall", "binding"]
if tl_generation() >= 4:  # recall has grouped-query attention: a TransformerBridge computes one
    MODELS.remove("recall")  # key/value per group, and a graph needs one per query head (TL 3)


def task_graph(name: str, n: int = 48):
    """The model, its held-out batch and the contrastive (difference) graph of answer - wrong."""
    model = zoo.load(name)
    batch = zoo.task(name).batch(model, n, split="test", seed=31)
    target = dp.LogitDiff(batch.answers, batch.wrong, name="answer - wrong")
    graph = dp.DePass(model).graph(batch.tokens, target, contrast=batch.corrupted)
    return model, batch, graph


# %% [markdown]
# ## One graph per model, conserved at every node
#
# Each graph is contrastive: edges score `out(clean) - out(corrupt)` on the zoo task's held-out
# prompts and their corrupted counterparts (documented in each zoo card), with the *difference
# linearisation* — every nonlinearity replaced by its exact secant between the two runs — so a
# node's incoming edges sum to its outgoing edges and the direct edges sum to the logit
# difference's actual change. `conservation()` reports the largest relative violation of each
# law (float32).

# %%
graphs = {}
rows = []
for name in MODELS:
    model, batch, graph = task_graph(name)
    graphs[name] = (model, batch, graph)
    direct = torch.tensor([e.kind == "direct" for e in graph.spec.edges])
    rows.append(
        {
            "model": name,
            "edges": graph.n_edges,
            "change of answer - wrong": float(graph.node_scores[:, 0, graph.spec.target].mean()),
            "sum of direct edges": float(graph.edge_scores[:, 0, direct].sum(-1).mean()),
            **{law: f"{err:.1e}" for law, err in graph.conservation().items()},
        }
    )
print(pd.DataFrame(rows).set_index("model").to_string())

# %% [markdown]
# ## Circuits, checked by edge patching
#
# The top-30 edges of each graph (pruned to input-to-target paths), and their faithfulness when
# every other edge is patched to its corrupted value: `(m(circuit) - m(corrupt)) / (m(clean) -
# m(corrupt))`, 1 being the clean model.

# %%
circuits = {}
rows = []
for name, (model, batch, graph) in graphs.items():
    circuit = graph.circuit(k=30)
    circuits[name] = circuit
    patcher = EdgePatcher(
        dp.DePass(model).adapter,
        graph.spec,
        batch.tokens,
        logit_diff_metric(batch.answers, batch.wrong),
        corrupted=batch.corrupted,
    )
    rows.append(
        {
            "model": name,
            "circuit edges": circuit.n_edges,
            "nodes": len(circuit.node_names),
            "faithfulness": round(patcher.faithfulness(circuit.keep), 3),
        }
    )
print(pd.DataFrame(rows).set_index("model").to_string())

# %% [markdown]
# ## The three-stage circuit of `binding`
#
# `binding` answers two-hop queries (`7 -> a ; a -> b ; ... ? b` -> `7`). Its mechanism, found by
# path patching: layer-0 heads find where each variable is assigned and copy values into their
# statements; layer-1 heads, at the alias's source, fetch the value assigned to it; layer-2 heads,
# at the query, read the resolved value and write it to the logits.

# %%
mechanism = zoo.mechanism("binding")
for stage, heads in mechanism.stages:
    print(f"{stage}: {', '.join(heads)}")
dp.plot.graph(circuits["binding"]).show()

# %% [markdown]
# The circuit holds a connected path through all three stages: stage-1 heads feed stage-2 heads
# (through their queries: *where* to look), stage-2 heads feed stage-3 heads (through their
# values: *what* is read), and stage-3 heads feed the logits.

# %%
(s1, h1), (s2, h2), (s3, h3) = mechanism.stages
table = circuits["binding"].edge_table()


def between(senders, receivers):
    return [
        f"{r['sender']} -> {r['receiver']} ({r['type']}) {r['score']:+.2f}"
        for r in table
        if r["sender"] in senders and r["receiver"] in receivers
    ]


for label, senders, receivers in [
    ("stage 1 -> stage 2", h1, h2),
    ("stage 2 -> stage 3", h2, h3),
    ("stage 3 -> logits", h3, ("logits",)),
]:
    found = between(senders, receivers)
    print(f"{label}: {len(found)} edges, e.g. {found[:3]}")
    assert found, label

# %% [markdown]
# ## Naming the edges against each model's mechanism
#
# For every edge of each documented mechanism: its rank among the graph's edges (by |score|,
# batch mean) and whether the top-30 circuit keeps it. Edges listed in a mechanism were each
# measured by path patching with plain TransformerLens hooks (`weights/<name>.paths.json`).

# %%
rows = []
for name, (_, _, graph) in graphs.items():
    scores = graph.scores().abs()
    order = {int(i): rank + 1 for rank, i in enumerate(scores.argsort(descending=True))}
    index = graph.spec.edge_index()
    for sender, receiver, kind in zoo.mechanism(name).edges:
        edge = index.get((sender, receiver, kind))
        rows.append(
            {
                "model": name,
                "edge": f"{sender} -> {receiver} ({kind})",
                "DePass score": None if edge is None else round(float(graph.scores()[edge]), 3),
                "rank": None if edge is None else order[edge],
                "in top-30 circuit": circuits[name].has_edge(sender, receiver, kind),
            }
        )
names = pd.DataFrame(rows)
print(names.groupby("model")["in top-30 circuit"].agg(["sum", "count"]).to_string())
print(names.to_string(index=False))

# %% [markdown]
# ## Induction: the previous-token head feeds every induction head's key
#
# With the QK-aware attention split (here `attention="pattern"`, absolute graph), the previous
# token head L0H1 reaches each induction head through its key, and that is the strongest input
# of every one of them.

# %%
model, batch, _ = graphs["induction"]
target = dp.LogitDiff(batch.answers, batch.wrong)
pattern_graph = dp.DePass(model, attention="pattern").graph(batch.tokens, target)
edges = pd.DataFrame(pattern_graph.edge_table())
for head in ["L1H0", "L1H1", "L1H2", "L1H3"]:
    incoming = edges[edges.receiver == head].copy()
    incoming["abs"] = incoming.score.abs()
    best = incoming.sort_values("abs", ascending=False).iloc[0]
    print(f"strongest input of {head}: {best.sender} ({best.type}) {best.score:+.3f}")
dp.plot.graph(pattern_graph, k=16).show()

# %% [markdown]
# ## Faithfulness against EAP, EAP-IG and ACDC
#
# `python -m depass_lens.evaluation.circuit_suite` scores every edge of every zoo model with each
# method (DePass absolute with the published and the QK-aware splits, contrastive DePass with the
# difference and the clean linearisation, EAP, EAP-IG with 20 steps, ACDC-style greedy patching
# over six thresholds) and evaluates each method's top-k circuits at the same budgets by edge
# patching, on 96 held-out prompts per model. Its results are loaded here (rerunning it takes
# several minutes, mostly ACDC).

# %%
results = Path("../benchmarks/results/circuits")
curves = {}
for name in MODELS:
    data = json.loads((results / f"{name}.json").read_text())
    curves[name] = {
        method: CircuitCurve(
            method,
            c["n_edges"],
            c["budgets"],
            c["faithfulness"],
            c.get("kept", []),
            c.get("seconds", 0.0),
        )
        for method, c in data["curves"].items()
    }
figure(curves).show()
areas = pd.DataFrame({m: {k: c.area for k, c in v.items()} for m, v in curves.items()}).T
print(areas.round(3).to_string())

# %% [markdown]
# The summary written by the suite (areas, the budgets where contrastive DePass is at least as
# faithful as EAP-IG, and the time each method took):

# %%
print((results / "summary.md").read_text())
