"""Feature-level faithfulness: which SAE latents drive a metric, against exact latent ablation.

Ground truth: with the SAE spliced in and its error term kept (so the clean run is unchanged),
zero-ablate one latent at every position, ``x -> x - a_i W_dec[i]``, and measure the exact change
of the metric on each prompt. A latent's DePass score is its share of the metric; removing it
changes the metric by ``-share`` exactly where the model is linear, so ``-score`` is compared with
the effect. The baselines are the sparse-feature-circuits estimates: attribution patching
(``-a_i <W_dec[i], grad>`` with the real gradient), integrated gradients on the latents (all of
the layer's latents scaled together from 0, error and ``b_dec`` fixed) and activation magnitude
(``sum_pos a_i |W_dec[i]|``, unsigned). Statistics are per prompt over the latents active in it
(Spearman, signed and of magnitudes; precision@k by magnitude), averaged over prompts, and pooled
over all (prompt, latent) pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

import depass_lens as dp
from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.agreement import precision_at_k, spearman
from depass_lens.sae import SAELatents
from depass_lens.sae.placement import Placement, encode, place
from depass_lens.sae.view import SAEView, as_sae_view

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]


def logit_diff_metric(answers: Tensor, wrong: Tensor) -> Metric:
    """``logit(answer) - logit(wrong)`` at the last position, per prompt."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        last = logits[:, -1]
        return last[rows, answers] - last[rows, wrong]

    return metric


@dataclass
class LatentSetup:
    """One SAE on one batch: its view, place, clean activations and the latents compared."""

    model: TLModel
    view: SAEView
    placement: Placement
    tokens: Int[Tensor, "batch pos"]
    acts: Float[Tensor, "batch pos d_sae"]
    latents: Int[Tensor, " n"]  # latents active somewhere in the batch
    W_dec: Float[Tensor, "n d_out"]  # their decoder rows, in the model's dtype

    @property
    def active(self) -> Float[Tensor, "batch n"]:
        """Which latents are active on each prompt (the set each prompt's ranking uses)."""
        return (self.acts[:, :, self.latents] != 0).any(1)

    def contribution(self, which: Tensor) -> Float[Tensor, "batch pos d_out"]:
        """``sum_{i in which} a_i W_dec[i]`` per position, in the SAE's output space."""
        rows = self.W_dec[which]
        return einops.einsum(self.acts[:, :, self.latents[which]], rows, "b p n, n d -> b p d")


def setup(model: TLModel, sae: Any, tokens: Tensor) -> LatentSetup:
    adapter = dp.DePass(model, progress=False).adapter  # whichever adapter fits the model
    view = as_sae_view(sae)
    placement = place(view, adapter, "sae_faithfulness")
    hooks = placement.needed_hooks(adapter)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    acts = encode(view, placement, cache, adapter.dtype)
    latents = (acts != 0).any(dim=(0, 1)).nonzero()[:, 0]
    W_dec = view.W_dec.to(device=acts.device, dtype=acts.dtype)[latents]
    return LatentSetup(model, view, placement, tokens, acts, latents, W_dec)


def _run_with_hooks(s: LatentSetup, hooks: list[tuple[Any, Any]]) -> Tensor:
    """The model's logits with ``hooks`` on, through the adapter (whose ``hooks`` give every
    backend HookedTransformer's semantics for several functions on one hook)."""
    with make_adapter(s.model).hooks(hooks):
        return s.model(s.tokens)


def _edit_hook(s: LatentSetup, delta: Tensor) -> Callable[[Tensor, Any], Tensor]:
    """A hook adding ``delta`` (SAE output space) to the SAE's output hook."""

    def hook(value: Tensor, hook: Any) -> Tensor:
        if value.ndim == 4:  # hook_z: [b p h e]
            return value + einops.rearrange(delta, "b p (h e) -> b p h e", h=value.shape[2])
        return value + delta

    return hook


Freeze = Literal["none", "norms", "all"]


def _frozen_hooks(s: LatentSetup, freeze: Freeze) -> list[tuple[Callable[[str], bool], Any]]:
    """Hooks that hold nonlinear quantities at their clean values during an ablation.

    ``"norms"``: every norm scale. ``"all"``: also attention patterns and each plain MLP's
    ``act(pre)/pre`` (the frozen-linearised model, where removing a latent changes the metric by
    exactly minus its DePass share with ``attention="value"``).
    """
    if freeze == "none":
        return []
    names = ("hook_scale",) if freeze == "norms" else ("hook_scale", "hook_pattern", "mlp.hook_pre")
    names_post = () if freeze == "norms" else ("mlp.hook_post",)
    with torch.no_grad():
        _, cache = s.model.run_with_cache(
            s.tokens, names_filter=lambda n: n.endswith(names + names_post)
        )
    live: dict[str, Tensor] = {}

    def hold(value: Tensor, hook: Any) -> Tensor:
        if hook.name.endswith("mlp.hook_pre"):
            live[hook.name] = value
            return value
        return cache[hook.name]

    def linear_post(value: Tensor, hook: Any) -> Tensor:
        pre_name = hook.name.replace("hook_post", "hook_pre")
        ratio = cache[hook.name] / cache[pre_name]
        return ratio * live[pre_name]

    hooks: list[tuple[Callable[[str], bool], Any]] = [(lambda n: n.endswith(names), hold)]
    if names_post:
        hooks.append((lambda n: n.endswith(names_post), linear_post))
    return hooks


@torch.no_grad()
def ablation_effects(
    s: LatentSetup, metric: Metric, freeze: Freeze = "none"
) -> Float[Tensor, "batch n"]:
    """Exact change of the metric when each latent alone is zero-ablated (error kept).

    ``freeze`` holds norm scales (or every nonlinearity DePass freezes) at their clean values:
    not a ground truth, but it shows which nonlinearity separates a share from an effect.
    """
    clean = metric(s.model(s.tokens))
    frozen = _frozen_hooks(s, freeze)
    out = torch.zeros(s.tokens.shape[0], len(s.latents), dtype=clean.dtype)
    for j in range(len(s.latents)):
        delta = -s.contribution(torch.tensor([j]))
        hooks: list[tuple[Any, Any]] = [(s.placement.hook_out, _edit_hook(s, delta)), *frozen]
        out[:, j] = metric(_run_with_hooks(s, hooks)) - clean
    return out


def gradient_scores(
    s: LatentSetup, metric: Metric, alphas: Sequence[float]
) -> Float[Tensor, "batch n"]:
    """``sum_pos a_i <W_dec[i], mean_alpha grad(alpha)>`` with all latents scaled by alpha.

    ``alphas=[1]`` is attribution patching's gradient at the clean point; a grid over (0, 1] is
    integrated gradients from the all-latents-off baseline (error and ``b_dec`` kept).
    """
    total = s.contribution(torch.arange(len(s.latents)))
    grads = []
    for alpha in alphas:
        seen: dict[str, Tensor] = {}

        def leaf(
            value: Tensor, hook: Any, alpha: float = alpha, seen: dict[str, Tensor] = seen
        ) -> Tensor:
            flat = value.detach()
            if flat.ndim == 4:
                flat = einops.rearrange(flat, "b p h e -> b p (h e)")
            seen["x"] = (flat - (1 - alpha) * total).requires_grad_(True)
            x = seen["x"]
            if value.ndim == 4:
                return einops.rearrange(x, "b p (h e) -> b p h e", h=value.shape[2])
            return x

        with torch.enable_grad():
            logits = s.model.run_with_hooks(s.tokens, fwd_hooks=[(s.placement.hook_out, leaf)])
            (grad,) = torch.autograd.grad(metric(logits).sum(), seen["x"])
        grads.append(grad)
    mean = torch.stack(grads).mean(0)
    along = einops.einsum(mean, s.W_dec, "b p d, n d -> b p n")
    return (s.acts[:, :, s.latents] * along).sum(1).detach()


def magnitude_scores(s: LatentSetup) -> Float[Tensor, "batch n"]:
    """``sum_pos a_i |W_dec[i]|``: how much the latent writes, whatever the metric."""
    return s.acts[:, :, s.latents].sum(1) * s.W_dec.norm(dim=-1)


def depass_scores(
    s: LatentSetup, target: dp.targets.Target, attention: str | None = None
) -> Float[Tensor, "batch n"]:
    """Each latent's DePass share of the target (adjoint mode, one backward)."""
    depass = dp.DePass(s.model, progress=False, attention=attention)
    source = SAELatents(s.view, latents=s.latents.tolist())
    attribution = depass.attribute(s.tokens, target, source, mode="adjoint")
    return attribution.scores[:, 0, : len(s.latents)].detach()


@dataclass
class FaithfulnessResult:
    """Per-method statistics against latent ablation, and how long each method took."""

    rows: dict[str, dict[str, float]]
    seconds: dict[str, float]
    n_prompts: int
    n_latents: int
    mean_active: float
    ks: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    removal: dict[str, dict[int, float]] = field(default_factory=dict)


@torch.no_grad()
def removal_drop(
    s: LatentSetup,
    metric: Metric,
    predicted: Float[Tensor, "batch n"],
    ks: Sequence[int],
    freeze: Freeze = "none",
) -> dict[int, float]:
    """Remove, on each prompt, the ``k`` active latents predicted to lower the metric most, all
    at once (SAE spliced, error kept); the mean drop of the metric as a fraction of its clean
    value. A many-latent intervention, where single-latent predictions must compose."""
    clean = metric(s.model(s.tokens))
    frozen = _frozen_hooks(s, freeze)
    key = predicted.masked_fill(~s.active, float("inf"))  # most negative predicted effect first
    out = {}
    for k in ks:
        chosen = key.argsort(dim=-1)[:, :k]
        mask = torch.zeros_like(predicted, dtype=s.acts.dtype).scatter(-1, chosen, 1.0)
        mask = mask * s.active.to(mask.dtype)
        coeff = s.acts[:, :, s.latents] * mask[:, None, :]
        delta = -einops.einsum(coeff, s.W_dec, "b p n, n d -> b p d")
        hooks: list[tuple[Any, Any]] = [(s.placement.hook_out, _edit_hook(s, delta)), *frozen]
        removed = metric(_run_with_hooks(s, hooks))
        out[k] = float(((clean - removed) / clean.abs().clamp_min(1e-12)).mean())
    return out


def compare(
    predicted: Float[Tensor, "batch n"],
    effect: Float[Tensor, "batch n"],
    active: Tensor,
    ks: Sequence[int],
    signed: bool = True,
) -> dict[str, float]:
    """Per-prompt Spearman (signed and of magnitudes) and precision@k over active latents,
    averaged; and Spearman pooled over all active (prompt, latent) pairs."""
    per: dict[str, list[float]] = {"spearman": [], "spearman_abs": []}
    per.update({f"precision@{k}": [] for k in ks})
    for b in range(predicted.shape[0]):
        p, e = predicted[b, active[b]].double(), effect[b, active[b]].double()
        if signed:
            per["spearman"].append(spearman(p, e))
        per["spearman_abs"].append(spearman(p.abs(), e.abs()))
        for k in ks:
            if k <= p.numel():
                per[f"precision@{k}"].append(precision_at_k(p, e, k))
    out = {key: sum(v) / len(v) if v else float("nan") for key, v in per.items()}
    p, e = predicted[active].double(), effect[active].double()
    out["pooled_spearman"] = spearman(p, e) if signed else float("nan")
    out["pooled_spearman_abs"] = spearman(p.abs(), e.abs())
    return out


def sae_faithfulness(
    model: TLModel,
    sae: Any,
    tokens: Tensor,
    answers: Tensor,
    wrong: Tensor,
    *,
    ks: Sequence[int] = (5, 10),
    ig_steps: int = 16,
    freeze: Freeze = "none",
    removal_ks: Sequence[int] = (1, 3, 5, 10),
) -> FaithfulnessResult:
    """DePass vs attribution patching vs integrated gradients vs activation magnitude, each
    against exact zero-ablation of every active latent, on a logit-difference metric.

    ``freeze`` (default ``"none"``, the ground truth) ablates with nonlinear quantities held at
    their clean values (see :func:`ablation_effects`), to locate disagreements.
    """
    metric = logit_diff_metric(answers, wrong)
    s = setup(model, sae, tokens)
    target = dp.LogitDiff(answers, wrong)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Tensor]) -> Tensor:
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        return value

    effect = timed("ablation (ground truth)", lambda: ablation_effects(s, metric, freeze))
    alphas = [(i + 0.5) / ig_steps for i in range(ig_steps)]
    predictions = {  # predicted change of the metric when the latent is removed
        "DePass (symmetric)": -timed(
            "DePass (symmetric)", lambda: depass_scores(s, target, "symmetric")
        ),
        "DePass (value)": -timed("DePass (value)", lambda: depass_scores(s, target, "value")),
        "attribution patching": -timed(
            "attribution patching", lambda: gradient_scores(s, metric, [1.0])
        ),
        f"integrated gradients ({ig_steps} steps)": -timed(
            "integrated gradients", lambda: gradient_scores(s, metric, alphas)
        ),
        "activation magnitude": timed("activation magnitude", lambda: magnitude_scores(s)),
    }
    active = s.active
    rows = {
        name: compare(p, effect, active, ks, signed=name != "activation magnitude")
        for name, p in predictions.items()
    }
    ranked = {**predictions, "activation magnitude": -predictions["activation magnitude"]}
    ranked["single-latent ablation (oracle)"] = effect
    removal = {name: removal_drop(s, metric, p, removal_ks, freeze) for name, p in ranked.items()}
    return FaithfulnessResult(
        rows,
        seconds,
        tokens.shape[0],
        len(s.latents),
        float(active.float().sum(-1).mean()),
        tuple(ks),
        {"hook": s.view.hook_out, "d_sae": s.view.d_sae, "freeze": freeze},
        removal,
    )


def table(result: FaithfulnessResult) -> str:
    """The result as a markdown table (best value per column in bold)."""
    cols = ["spearman", "spearman_abs", *[f"precision@{k}" for k in result.ks]]
    cols += ["pooled_spearman", "pooled_spearman_abs"]
    best = {
        c: max(r[c] for r in result.rows.values() if r[c] == r[c]) for c in cols
    }  # NaN-free max

    def cell(v: float, c: str) -> str:
        if v != v:
            return "n/a"
        text = f"{v:.3f}"
        return f"**{text}**" if abs(v - best[c]) < 5e-4 else text

    head = "| method | " + " | ".join(cols) + " | seconds |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, r in result.rows.items():
        key = "integrated gradients" if name.startswith("integrated") else name
        secs = result.seconds.get(key, float("nan"))
        lines.append(f"| {name} | " + " | ".join(cell(r[c], c) for c in cols) + f" | {secs:.2f} |")
    truth = result.seconds["ablation (ground truth)"]
    lines.append(
        "| *ablation (ground truth)* | " + " | ".join("1" for _ in cols) + f" | {truth:.2f} |"
    )
    return "\n".join(lines)


def removal_table(result: FaithfulnessResult) -> str:
    """Mean metric drop (fraction of the clean value) when each method's top-k are removed."""
    ks = sorted(next(iter(result.removal.values())))
    best = {k: max(v[k] for n, v in result.removal.items() if "oracle" not in n) for k in ks}
    lines = ["| ranking | " + " | ".join(f"top-{k} removed" for k in ks) + " |"]
    lines.append("|" + "---|" * (len(ks) + 1))
    for name, drops in result.removal.items():
        cells = [
            f"**{drops[k]:.3f}**"
            if abs(drops[k] - best[k]) < 5e-4 and "oracle" not in name
            else f"{drops[k]:.3f}"
            for k in ks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "FaithfulnessResult",
    "ablation_effects",
    "compare",
    "depass_scores",
    "gradient_scores",
    "logit_diff_metric",
    "magnitude_scores",
    "removal_drop",
    "removal_table",
    "sae_faithfulness",
    "setup",
    "table",
]
