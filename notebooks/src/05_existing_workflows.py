# %% [markdown]
# # DePass inside an existing TransformerLens analysis
#
# The decomposed run's hook points carry TransformerLens's names with a `comp` axis after
# `batch`, so caching, hooks and `ActivationCache` helpers work as usual.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import depass_lens as dp
from depass_lens import zoo

model = zoo.load("ioi")
prompt = "When Mary and John went to the store , John gave a drink to"
logits, cache = model.run_with_cache(prompt)  # your usual cache
dp_model = dp.DePass(model)

# %% [markdown]
# ## Caching the decomposed stream (reusing your cache for the frozen values)

# %%
res = dp_model.run(
    prompt,
    source=dp.Modules(0),
    cache=cache,
    names_filter=lambda n: "resid" in n or n == "unembed.hook_in",
)
print(res)  # a DecomposedCache (an ActivationCache)
print(res["resid_post", -1].shape)  # batch comp pos d_model
print([str(label) for label in res.labels])

# %% [markdown]
# ## Combining with ActivationCache functions
#
# `apply_ln_to_stack` with the real cache's final-norm scale turns each decomposed component at
# the last layer into its direct logit contribution, exactly what `logit_attrs` does for TL's
# own stacks. (The bias entries differ by design: DePass's bias also holds `b_U` and the final
# norm's bias, which TransformerLens's direct logit attribution leaves out.)

# %%
final = res["resid_post", -1][0, :, -1]  # comp d_model at the last position
stacked = cache.apply_ln_to_stack(final[:, None], layer=None, pos_slice=-1)[:, 0]
mary, john = (model.tokens_to_residual_directions(name) for name in ("Mary", "John"))
direction = mary - john
print("per component:", ((stacked * model.ln_final.w) @ direction).detach())
print("DePass shares :", res.logit_attribution("Mary")[0] - res.logit_attribution("John")[0])

# %% [markdown]
# ## Masking a component mid-pass
#
# Remove layer 0's attention output at `blocks.1.hook_resid_mid` and watch the logit difference.


# %%
def drop_attention(x, hook):
    x = x.clone()
    x[:, 0] = 0  # component 0 = layer 0's attention
    return x


masked = dp_model.run(
    prompt,
    source=dp.Modules(0),
    cache=cache,
    fwd_hooks=[("blocks.1.hook_resid_mid", drop_attention)],
)
before = (res.logit_attribution("Mary") - res.logit_attribution("John")).sum()
after = (masked.logit_attribution("Mary") - masked.logit_attribution("John")).sum()
print(f"logit difference {before:.3f} -> {after:.3f} without L0 attention's downstream share")
