# %% [markdown]
# # Quickstart: DePass on the zoo's IOI model
#
# Token-, head- and neuron-level attribution in a few lines, offline, on a small GPT-2-style model
# the project trained on indirect-object identification. Every score is an exact share: the
# components sum to the real activation at every hook point.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import depass_lens as dp
from depass_lens import zoo

model = zoo.load("ioi")
prompt = "When Mary and John went to the store , John gave a drink to"
target = dp.LogitDiff("Mary", "John")
dp_model = dp.DePass(model)
print(model.to_str_tokens(prompt))

# %% [markdown]
# ## Tokens

# %%
tokens = dp_model.attribute(prompt, target)
print(f"logit(Mary) - logit(John) = {tokens.target_values[0, 0]:.3f}")
print("top tokens:", tokens.top(5))
dp.plot.tokens(tokens).show()

# %% [markdown]
# ## Heads and neurons (one forward + one backward for all of them)

# %%
both = dp_model.attribute(prompt, target, source=[dp.Heads(), dp.Neurons()])
heads, neurons = both.restrict("head"), both.restrict("neuron")
print("top heads:", heads.top(5))
print("top neurons:", neurons.top(5))
dp.plot.heads(heads).show()

# %% [markdown]
# ## The invariant, checked
#
# Forward mode propagates the components explicitly; at every hook point they sum to the real
# activation from `run_with_cache`, and the shares sum to the target.

# %%
logits, cache = model.run_with_cache(prompt)
res = dp_model.run(prompt, source=dp.Tokens(), cache=cache)
errors = res.check_lossless(cache)
print(f"{len(errors)} hook points, max relative error {max(errors.values()):.1e}")
print(f"shares + bias - target: {tokens.completeness_error():.1e}")
forward = dp_model.attribute(prompt, target, mode="forward")
print("adjoint vs forward:", float((forward.scores - tokens.scores).abs().max()))
