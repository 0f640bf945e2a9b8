# %% [markdown]
# # The QK circuit: induction heads and who steers them
#
# An induction head finds the earlier occurrence of the current token and copies the token that
# followed it. It can find it only because a *previous-token head* in an earlier layer wrote
# "the token before me was X" into every position, which the induction head's keys read
# (K-composition). The previous-token head matters by steering where the induction head looks,
# not by what it writes, so DePass with frozen patterns (`attention="value"`, as published) gives
# it little credit. Here we split the attention scores themselves, and let the pattern carry
# credit, on the zoo's 2-layer attention-only induction model.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

import depass_lens as dp
from depass_lens import zoo
from depass_lens.evaluation import spearman
from depass_lens.zoo.roles import heads_with_role

model = zoo.load("induction")
task = zoo.task("induction")
batch = task.batch(model, 200, seed=11)  # the held-out prompts of the shipped ablation results
examples = task.examples(200, seed=11)  # the same prompts as words
# the key an induction head should pick: the token after the earlier occurrence of the last token
key = torch.tensor([ex.words.index(ex.words[-1]) + 2 for ex in examples])  # +1 BOS, +1 next
rows = torch.arange(len(key))
assert (batch.tokens[rows, key] == batch.answers).all()
print(" ".join(examples[0].words), "->", examples[0].answer, f"(key position {int(key[0])})")
dp_model = dp.DePass(model)

# %% [markdown]
# ## Head roles
#
# TransformerLens's head detector on repeated random sequences (stored with the model): the share
# of each head's attention that falls where the role predicts.

# %%
roles = zoo.info("induction")["head_roles"]
fig = make_subplots(rows=1, cols=3, subplot_titles=list(roles), horizontal_spacing=0.08)
for col, (role, grid) in enumerate(roles.items(), start=1):
    found = [f"{head} ({score:.2f})" for head, score in heads_with_role(roles, role)]
    print(f"{role}: {', '.join(found) or 'none'}")
    fig.add_trace(
        go.Heatmap(z=grid, zmin=0, zmax=1, colorscale="Blues", showscale=col == 3), 1, col
    )
fig.update_xaxes(title_text="head", dtick=1)
fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed")
fig.update_layout(height=260, template="plotly_white")
fig.show()

# %% [markdown]
# ## Who makes each induction head look at the right key
#
# `dp.AttentionScore(1, head, -1, key)` is the head's pre-softmax score from the last position to
# the correct key, split among layer 0's heads (`rest` = the token and position embeddings, plus
# `bias`). `side="key"` splits it by what each component put into the key (with the real
# queries), `side="query"` by what it put into the query (with the real keys).

# %%
heads = [f"L1H{h}" for h in range(4)]
fig = make_subplots(rows=1, cols=2, subplot_titles=["key side", "query side"])
split = {}
for col, side in enumerate(("key", "query"), start=1):
    targets = [dp.AttentionScore(1, h, -1, key, side=side) for h in range(4)]
    split[side] = dp_model.attribute(batch.tokens, targets, source=dp.Heads(0))
    names = [str(label).replace("L0.rest", "embeddings") for label in split[side].labels]
    share = split[side].scores.mean(0) / split[side].target_values.mean(0)[:, None]
    print(f"{side:5s} side, share of each induction head's score:")
    for head, row in zip(heads, share):
        print(f"  {head}: " + "  ".join(f"{n} {v:+.2f}" for n, v in zip(names, row)))
    fig.add_trace(
        go.Heatmap(
            z=share.tolist(),
            x=names,
            y=heads,
            zmin=-1,
            zmax=1,
            colorscale="RdBu_r",
            showscale=col == 2,
        ),
        1,
        col,
    )
fig.update_layout(
    title="Shares of the score on the correct key", height=300, template="plotly_white"
)
fig.show()

# %% [markdown]
# On the key side the previous-token head L0H1 supplies almost all of every induction head's
# score: K-composition, read off directly. On the query side the embeddings (the current token
# itself) do most of the work: the query just says which token to look for.
#
# ## Completeness: the shares sum to TransformerLens's scores

# %%
_, cache = model.run_with_cache(batch.tokens)
real = cache["blocks.1.attn.hook_attn_scores"][rows, :, -1, key]  # batch head
print("mean score on the correct key:", real.mean(0).numpy().round(2))
for side, attribution in split.items():
    gap = (attribution.scores.sum(-1) - real).abs().max()
    print(f"{side:5s} side: max |sum of shares - hook_attn_scores| = {gap:.1e}")

# %% [markdown]
# ## Ranking heads: value, pattern and symmetric splits against ablation
#
# The same logit difference (answer minus a wrong token), attributed to every head with the three
# attention splits, against the shipped mean-ablation effects on these prompts.

# %%
importance = -torch.tensor(zoo.ground_truth("induction")["heads_mean"])  # drop when removed
target = dp.LogitDiff(batch.answers, batch.wrong, name="answer - wrong")
labels = [f"L{i // 4}H{i % 4}" for i in range(importance.numel())]
fig = go.Figure(go.Bar(x=labels, y=(importance / importance.max()).flatten(), name="ablation"))
for side in ("value", "pattern", "symmetric"):
    scores = dp.DePass(model, attention=side).attribute(batch.tokens, target, source=dp.Heads())
    grid = scores.heads()[:, 0].mean(0)
    rho = spearman(grid.flatten(), importance.flatten())
    top = [labels[i] for i in grid.flatten().argsort(descending=True)[:3].tolist()]
    print(f"{side:9s} Spearman {rho:+.2f}; top {top}; L0H1 {grid[0, 1]:+.2f}", end="")
    print(f"; completeness error {scores.completeness_error():.1e}")
    fig.add_trace(go.Bar(x=labels, y=(grid / grid.max()).flatten(), name=side))
print("ablation:", [(n, round(float(v), 2)) for n, v in zip(labels, importance.flatten())])
fig.update_layout(
    title="Head importance (each scaled to its maximum)", template="plotly_white", height=320
)
fig.show()

# %% [markdown]
# With frozen patterns L0H1 gets almost nothing: what it writes is not the answer, only the
# address of it. The pattern side credits it with the induction heads' move from a uniform
# pattern to the right key and puts it first, as ablation does; the symmetric split, half of
# each, ranks it third. Layer 1's scores are the same in all three splits: no attention layer
# comes after it.
#
# ## Keeping the decomposed scores and patterns in a DecomposedCache
#
# `run` keeps `hook_attn_scores` (score shares) and, with a pattern-side split, `hook_pattern`
# (pattern shares) when `names_filter` asks for them, each with a `comp` axis after `batch`.
# The cache's score shares are the symmetric ones (the average of the key and query sides), the
# ones the pattern split uses.

# %%
res = dp.DePass(model, attention="pattern").run(
    batch.tokens,
    source=dp.Heads(0),
    names_filter=lambda n: n.endswith(("hook_attn_scores", "hook_pattern")),
)
print(res, {name: tuple(value.shape) for name, value in res.cache_dict.items()})
print("relative error vs the real cache:", res.check_lossless(cache))
scores = res["blocks.1.attn.hook_attn_scores"][rows, :, :, -1, key]  # batch comp head
pattern = res["blocks.1.attn.hook_pattern"][rows, :, :, -1, key]
symmetric = dp_model.attribute(
    batch.tokens,
    [dp.AttentionScore(1, h, -1, key, side="symmetric") for h in range(4)],
    source=dp.Heads(0),
)
gap = (scores.transpose(1, 2) - symmetric.scores).abs().max()
print(f"cache score shares vs AttentionScore(side='symmetric'): max gap {gap:.1e}")
real_pattern = cache["blocks.1.attn.hook_pattern"][rows, :, -1, key]
print("pattern on the correct key:", real_pattern.mean(0).numpy().round(3))
for name, row in zip(names, pattern.mean(0)):
    print(f"  {name:10s} share {row.numpy().round(3)}")

# %% [markdown]
# Of each induction head's attention on the correct key (about 0.8), L0H1 accounts for about
# half and the embeddings for most of the rest; `bias` holds the uniform pattern the split starts
# from (1/20 here) plus the constant terms' small share.
