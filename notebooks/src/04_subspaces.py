# %% [markdown]
# # Subspaces: a language probe on the bilingual zoo model
#
# The `bilingual` model answers the same facts in two synthetic languages with disjoint
# vocabularies. A difference-of-means probe (shipped with the model) reads the language from the
# residual stream. We ask which input tokens write into the probe's direction (subspace -> input),
# then split the stream into the language subspace and its complement and read each out.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import torch

import depass_lens as dp
from depass_lens import zoo

model = zoo.load("bilingual")
probe = zoo.info("bilingual")["probe"]
direction = torch.tensor(probe["direction"])
print(probe["hook"], "held-out probe accuracy", probe["accuracy"])
dp_model = dp.DePass(model)

# %% [markdown]
# ## Subspace -> input

# %%
target = dp.Direction(direction, pos=-1, hook=probe["hook"], name="language probe")
for prompt in ["Alice lives in", "Alice_b lives_b in_b"]:
    attr = dp_model.attribute(prompt, target)
    print(f"{prompt!r}: reading {attr.target_values[0, 0]:+.2f}; tokens", attr.top(3))

# %% [markdown]
# ## Splitting the residual stream into the language subspace and the rest
#
# At the probe's layer, the stream's projection on the probe direction is one component and the
# orthogonal rest another. Each is read out through the unembedding (the frozen final norm makes
# this exact): the rest carries the *meaning* — the answer in both languages — while the
# language part pushes tokens of the prompt's language.

# %%
layer = int(probe["hook"].split(".")[1])
source = dp.Subspace(layer, direction[None], hook=probe["hook"])
for prompt in ["Alice lives in", "Alice_b lives_b in_b"]:
    res = dp_model.run(prompt, source=source)
    logits = res.logits()[0, :, -1]
    for name, row in zip(["language", "rest"], logits[:2]):
        top = row.topk(4).indices
        print(f"{prompt!r:24} {name:9}", model.to_str_tokens(top))

# %% [markdown]
# ## A 2-D view: probe direction vs the main direction of the rest

# %%
task = zoo.task("bilingual")
batch = task.batch(model, 200, seed=3)
_, cache = model.run_with_cache(batch.tokens, names_filter=probe["hook"])
states = cache[probe["hook"]][:, -1]
along = states @ direction
rest = states - along[:, None] * direction
_, _, v = torch.pca_lowrank(rest, q=1)
points = torch.stack([along, (rest @ v)[:, 0]], dim=1)
dp.plot.subspace_scatter(
    points,
    batch.labels,
    axis_names=("language probe", "top PC of the rest"),
    title="Residual stream at the probe layer, by language",
).show()
