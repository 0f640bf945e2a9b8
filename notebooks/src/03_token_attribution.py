# %% [markdown]
# # Token attribution: Disrupt-top and Recover-top against the baselines
#
# Mask the tokens a method ranks highest (Disrupt-top: the model's original answer should lose the
# most probability) or keep only them (Recover-top: it should keep the most), for every method.

# %%
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
import plotly.graph_objects as go

from depass_lens import zoo
from depass_lens.evaluation import TaskBatch, evaluate

model = zoo.load("ioi")
task = zoo.task("ioi")
batch = TaskBatch.from_zoo(task.batch(model, 24, seed=9))
report = evaluate(model, batch, "tokens", name="ioi", progress=False)
print(report.markdown())

# %%
for mode in ("disrupt", "recover"):
    fig = go.Figure()
    for method, curves in report.curves.items():
        curve = curves[mode]
        fig.add_trace(go.Scatter(x=curve.grid, y=curve.values["prob"], name=method))
    fig.update_layout(
        title=f"{mode}-top on ioi",
        xaxis_title="fraction of tokens",
        yaxis_title="probability of the original answer",
        template="plotly_white",
    )
    fig.show()
