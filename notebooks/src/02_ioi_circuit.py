# %% [markdown]
# # The IOI circuit of the zoo model, found with DePass and checked by ablation
#
# In the classic IOI analysis of GPT-2 small, *name mover* heads at the end copy the indirect
# object's name, *S-inhibition* heads tell them not to copy the subject, and *duplicate-token* /
# *induction* heads detect that the subject is repeated. Here we look for the same roles in the
# zoo's 3-layer model, and compare DePass with exhaustive ablation, attribution patching and
# TransformerLens's direct logit attribution.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.evaluation import TaskBatch, baselines, spearman

model = zoo.load("ioi")
task = zoo.task("ioi")
batch = TaskBatch.from_zoo(task.batch(model, 48, seed=5), task.batch(model, 48, "train", seed=6))
dp_model = dp.DePass(model)
heads = dp_model.attribute(batch.tokens, batch.target(), source=dp.Heads())
grid = heads.heads()[:, 0].mean(0)  # layer x head, mean over prompts
print(grid)
dp.plot.heads(heads).show()

# %% [markdown]
# ## Ground truth: exhaustive mean-ablation (shipped with the model)

# %%
truth = zoo.ground_truth("ioi")
importance = -torch.tensor(truth["heads_mean"])  # drop of the logit difference when removed
print(importance)
print("Spearman(DePass, ablation):", round(spearman(grid.flatten(), importance.flatten()), 3))
print(zoo.card("ioi").split("## Circuit")[1])

# %% [markdown]
# ## Roles: what each important head attends to
#
# A name mover attends from the final position to the indirect object; a duplicate-token head
# attends from the second subject mention back to the first. We read the real patterns.

# %%
_, cache = model.run_with_cache(batch.tokens)
io_pos, s1_pos, s2_pos = [], [], []
for row, answer in zip(batch.tokens, batch.answers):
    names = [i for i, t in enumerate(row.tolist()) if t == int(answer)]
    io_pos.append(names[0])
for row, wrong in zip(batch.tokens, batch.wrong):
    where = [i for i, t in enumerate(row.tolist()) if t == int(wrong)]
    s1_pos.append(where[0])
    s2_pos.append(where[-1])
rows = torch.arange(len(batch))
for layer in range(model.cfg.n_layers):
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    to_io = pattern[rows, :, -1, torch.tensor(io_pos)].mean(0)
    dup = pattern[rows, :, torch.tensor(s2_pos), torch.tensor(s1_pos)].mean(0)
    print(f"layer {layer}: END->IO {to_io.numpy().round(2)}  S2->S1 {dup.numpy().round(2)}")

# %% [markdown]
# ## Other methods on the same question

# %%
# AtP estimates the change when a head is patched from the corrupted run: importance = -change
atp = (
    -baselines.COMPONENT_METHODS["attribution-patching"](
        model, batch.tokens, batch.metric(), level="heads", corrupted_tokens=batch.corrupted
    )
    .mean(0)
    .view_as(grid)
)
stack = cache.stack_head_results(layer=model.cfg.n_layers, pos_slice=-1, apply_ln=True)
direction = (model.W_U[:, batch.answers] - model.W_U[:, batch.wrong]).T  # batch d_model
dla = (stack * direction).sum(-1).mean(-1).view_as(grid)  # direct effect only
for name, scores in {"DePass": grid, "AtP": atp, "DLA": dla}.items():
    rho = spearman(scores.flatten().detach(), importance.flatten())
    top = scores.flatten().argsort(descending=True)[:3].tolist()
    labels = [f"L{i // 4}H{i % 4}" for i in top]
    print(f"{name:7s} Spearman vs ablation {rho:+.2f}; top heads", labels)

# %% [markdown]
# Note the frozen QK circuit: a head that matters by *changing where later heads look* (the
# S-inhibition role) gets DePass credit only for what it writes through its OV path; ablation sees
# its whole effect. See the docs' limitations page.
#
# ## The same analysis on GPT-2 small (needs internet)

# %%
import socket

from transformer_lens import HookedTransformer

try:
    socket.getaddrinfo("huggingface.co", 443)
    gpt2 = HookedTransformer.from_pretrained("gpt2-small")
except Exception as exc:  # offline: the model hub is unreachable
    print(f"skipped: gpt2-small cannot be downloaded here ({type(exc).__name__}: {exc})")
else:
    prompt = "When Mary and John went to the store, John gave a drink to"
    scores = dp.DePass(gpt2).attribute(prompt, dp.LogitDiff(" Mary", " John"), source=dp.Heads())
    print(scores.top(10))
