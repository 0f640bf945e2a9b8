# %% [markdown]
# # SAE features: which latents drive the answer, and what makes them fire
#
# A sparse autoencoder splits the residual stream into sparse latents. DePass takes that split as
# its starting decomposition: each active latent's decoder contribution `a_i W_dec[i]` is a
# component, the SAE's reconstruction error is a component of its own, and `b_dec` joins the
# bias, so the shares add up exactly. Here we use the SAE shipped with the zoo's `ioi` model.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import pandas as pd
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.evaluation.sae_faithfulness import removal_table, sae_faithfulness, table
from depass_lens.zoo.saes import sae_stats

torch.set_num_threads(1)
model = zoo.load("ioi")
sae = zoo.load_sae("ioi")  # a SimpleSAE; zoo.load_sae("ioi", as_saelens=True) gives SAELens's SAE
stats = sae_stats("ioi")
print(sae, f"L0 {stats['L0']:.2f}, explained variance {stats['explained_variance']:.4f}")

# %% [markdown]
# ## Latents for a logit difference
#
# One forward and one backward (adjoint mode) score every active latent of the prompt.

# %%
prompt = "When Mary and John went to the store , John gave a drink to"
dp_model = dp.DePass(model, progress=False)
target = dp.LogitDiff("Mary", "John")
scores = dp_model.attribute(prompt, target, source=dp.SAELatents(sae))
print("logit difference:", float(scores.target_values[0, 0]))
print("latents + error + bias:", float(scores.scores.sum()))
pd.DataFrame(scores.top(8), columns=["component", "score"])

# %% [markdown]
# Each bar is labelled with the tokens the latent's decoder vector promotes (its decoder logit
# lens). The top latent writes "Mary": an indirect-object name latent.

# %%
dp.plot.latents(scores, dp_model, sae, k=10).show()

# %% [markdown]
# ## Where the latent acts
#
# `by_position=True` gives one component per (latent, position): the share of latent 110 at each
# token.

# %%
at_pos = dp_model.attribute(prompt, target, source=dp.SAELatents(sae, by_position=True))
tokens = model.to_str_tokens(prompt)
rows = [
    (lab.pos, tokens[lab.pos], float(at_pos.scores[0, 0, i]))
    for i, lab in enumerate(at_pos.labels)
    if lab.kind == "latent" and lab.index == 110
]
pd.DataFrame(rows, columns=["pos", "token", "share of F110"])

# %% [markdown]
# ## What makes latent 110 fire
#
# A latent's pre-activation is an affine read-out of the stream, so it is a target like any
# other: heads and tokens upstream of the SAE get their exact shares of it.

# %%
fires = dp.SAELatent(sae, latent=110, pos=-1)
by_head = dp_model.attribute(prompt, fires, source=dp.Heads(layers=[0, 1]))
by_token = dp_model.attribute(prompt, fires, source=dp.Tokens())
print("pre-activation:", float(by_head.target_values[0, 0]))
print("heads:", by_head.top(4))
print("tokens:", by_token.top(4))
dp.plot.heads(by_head).show()

# %% [markdown]
# ## Does the share predict what ablating a latent does?
#
# Ground truth: zero-ablate one latent (SAE spliced in, error kept) and measure the exact change of
# the logit difference. On 16 held-out prompts (the full run on 64 is
# `python -m benchmarks.sae_faithfulness`), compare DePass with attribution patching, integrated
# gradients on the latents and activation magnitude. On this model attribution patching predicts
# single-latent ablation best: removing a latent also changes the LayerNorm scales, which DePass
# freezes so that its shares add up. The run with `freeze="norms"` holds the scales at their clean
# values. The removal table takes each method's top-k latents out at once (fraction of the logit
# difference lost).

# %%
batch = zoo.task("ioi").batch(model, 16, "test", 11)
for freeze in ("none", "norms"):
    result = sae_faithfulness(
        model, sae, batch.tokens, batch.answers, batch.wrong, ig_steps=8, freeze=freeze
    )
    print(f"ablation with freeze={freeze!r}\n{table(result)}\n")
    if freeze == "none":
        print(f"top-k removed at once\n{removal_table(result)}\n")
