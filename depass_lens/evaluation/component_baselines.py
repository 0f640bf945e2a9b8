"""Component-level baselines: a score per head or neuron (layer-major, see ``levels``).

Orientation: attribution patching and exact ablation/patching return *change effects*
``metric(after) - metric(clean)`` (negative for a component the metric needs); gradient x
activation returns its first-order *importance* ``metric(clean) - metric(zeroed)``; activation
norm and random are unsigned. ``registry.component_sign`` records this for the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapters import make_adapter
from depass_lens.evaluation.forward import final_logits, resid_pre, tile
from depass_lens.evaluation.levels import (
    Hook,
    LevelSpec,
    ablation_fills,
    ablation_hooks,
    component_activations,
    resolve_level,
)
from depass_lens.evaluation.metrics import (
    Metric,
    bind_mask,
    metric_at,
    metric_positions,
    real_mask,
)
from depass_lens.evaluation.registry import ComponentTask, component_method
from depass_lens.evaluation.token_baselines import seeded_uniform


def _acts_and_grads(task: ComponentTask, metric: Metric, spec: LevelSpec) -> tuple[Tensor, Tensor]:
    """Clean activations and the metric's gradient at them, as ``[batch pos n_comp width]``."""
    store: dict[int, Tensor] = {}

    def keeper(layer: int):
        def keep(value: Tensor, hook) -> Tensor:
            store[layer] = value
            return value  # what flows on is what we differentiate at (on either backend)

        return keep

    hooks: list[Hook] = [(spec.hook_name(layer), keeper(layer)) for layer in spec.layers]
    with torch.enable_grad():
        logits = task.model.run_with_hooks(
            task.tokens, fwd_hooks=hooks, attention_mask=task.attention_mask
        )
        grads = torch.autograd.grad(metric(logits).sum(), [store[k] for k in spec.layers])
    acts = spec.stack({k: store[k].detach() for k in spec.layers})
    return acts, spec.stack(dict(zip(spec.layers, grads)))


def _sum_over_positions(
    x: Float[Tensor, "batch pos n_comp width"], tokens: Tensor, attention_mask: Tensor | None
) -> Float[Tensor, "batch n_comp"]:
    weight = real_mask(tokens, attention_mask).to(x.dtype)
    return einops.einsum(x, weight, "b p c w, b p -> b c")


def _first_order(
    task: ComponentTask, step: Callable[[LevelSpec, Tensor], Tensor]
) -> Float[Tensor, "batch n_comp"]:
    """``step(spec, a_clean) . dmetric/da`` summed over real positions (the gradient family).

    ``step`` is the activation change the method weighs by the gradient: ``a_corrupt - a_clean``
    for attribution patching, ``a_clean - 0`` for gradient x activation.
    """
    spec = resolve_level(task.model, task.level)
    metric = bind_mask(task.metric, task.attention_mask)
    clean, grad = _acts_and_grads(task, metric, spec)
    return _sum_over_positions(step(spec, clean) * grad, task.tokens, task.attention_mask)


@component_method
def attribution_patching(task: ComponentTask) -> Float[Tensor, "batch n_comp"]:
    """AtP (Nanda; Kramar et al.): ``(a_corrupt - a_clean) . dmetric/da`` over positions.

    First-order estimate of the patching effect ``metric(patched) - metric(clean)``, from one
    clean forward and backward pass and one corrupted forward pass.
    """
    corrupted = task.corrupted_tokens
    if corrupted is None:
        raise ValueError("attribution patching needs corrupted_tokens")

    def patch(spec: LevelSpec, clean: Tensor) -> Tensor:
        corrupt = component_activations(task.model, spec, corrupted, task.attention_mask)
        return spec.stack(corrupt) - clean

    return _first_order(task, patch)


@component_method
def gradient_x_activation(task: ComponentTask) -> Float[Tensor, "batch n_comp"]:
    """``a . dmetric/da`` over positions: first-order ``metric(clean) - metric(zero-ablated)``."""
    return _first_order(task, lambda _, clean: clean)


@component_method
@torch.no_grad()
def activation_norm(
    task: ComponentTask, positions: Literal["metric", "all"] = "metric"
) -> Float[Tensor, "batch n_comp"]:
    """Norm of each component's activation (``z`` of a head, ``|post|`` of a neuron).

    ``positions="metric"``: at the metric's position; ``"all"``: over all real positions.
    """
    tokens, mask = task.tokens, task.attention_mask
    spec = resolve_level(task.model, task.level)
    stacked = spec.stack(component_activations(task.model, spec, tokens, mask))
    if positions == "metric":
        query = metric_positions(task.metric, tuple(tokens.shape), mask)  # type: ignore[arg-type]
        return stacked[torch.arange(len(tokens)), query].norm(dim=-1)
    if positions == "all":
        return _sum_over_positions(stacked.pow(2), tokens, mask).sqrt()
    raise ValueError(f"positions must be 'metric' or 'all', not {positions!r}")


@component_method
def random_components(task: ComponentTask, seed: int = 0) -> Float[Tensor, "batch n_comp"]:
    """Uniform random scores (seeded)."""
    spec = resolve_level(task.model, task.level)
    return seeded_uniform((len(task.tokens), spec.n_comp), seed).to(task.tokens.device)


def _one_hot_rows(chunk: range, batch: int, n_comp: int, offset: int) -> Bool[Tensor, "rows n"]:
    """``(m b)`` rows; the rows of replica ``j`` mask component ``offset + chunk[j]``."""
    mask = torch.zeros(len(chunk), batch, n_comp, dtype=torch.bool)
    for j, index in enumerate(chunk):
        mask[j, :, offset + index] = True
    return einops.rearrange(mask, "m b n -> (m b) n")


@component_method
@torch.no_grad()
def exact_ablation(
    task: ComponentTask,
    ablation: Literal["zero", "mean", "patch"] = "zero",
    mean_over: Literal["all", "batch"] = "all",
    batch_size: int = 128,
    progress: bool = True,
) -> Float[Tensor, "batch n_comp"]:
    """Effect ``metric(ablated) - metric(clean)`` of ablating each component alone, per prompt.

    ``ablation``: ``"zero"``; ``"mean"`` over ``reference_tokens`` (default: the batch; see
    ``levels.component_means`` for ``mean_over``); ``"patch"``: the component's activation on
    ``corrupted_tokens`` (activation patching, what AtP approximates). Batched over components:
    the clean stream entering the component's layer is computed once and tiled, with one
    component ablated per replica (``batch_size`` rows per forward pass from that layer).
    """
    model, tokens, attention_mask = task.model, task.tokens, task.attention_mask
    spec = resolve_level(model, task.level)
    metric = bind_mask(task.metric, attention_mask)
    batch = len(tokens)
    fills = ablation_fills(
        model,
        spec,
        ablation,
        tokens=tokens,
        attention_mask=attention_mask,
        reference_tokens=task.reference_tokens,
        corrupted_tokens=task.corrupted_tokens,
        mean_over=mean_over,
    )
    positions = metric_positions(metric, tuple(tokens.shape), attention_mask)  # type: ignore[arg-type]
    clean = metric_at(metric, final_logits(model, tokens, positions, attention_mask=attention_mask))
    streams = resid_pre(model, tokens, spec.layers, attention_mask)
    shortformer = None
    if make_adapter(model).positional == "shortformer":
        shortformer = model.input_to_embed(tokens, attention_mask=attention_mask)[2]
    per_pass = max(1, batch_size // batch)
    chunks = [
        (i, range(start, min(start + per_pass, spec.width)))
        for i in range(len(spec.layers))
        for start in range(0, spec.width, per_pass)
    ]
    effects = torch.empty(batch, spec.n_comp, dtype=clean.dtype, device=clean.device)
    for i, chunk in tqdm(chunks, desc=f"{ablation}-ablation", disable=not progress, delay=2):
        layer, times = spec.layers[i], len(chunk)
        mask = _one_hot_rows(chunk, batch, spec.n_comp, i * spec.width)
        hooks = ablation_hooks(spec, mask, None if fills is None else fills.repeat(times))
        final = final_logits(
            model,
            tile(streams[layer], times),  # type: ignore[arg-type]
            tile(positions, times),  # type: ignore[arg-type]
            fwd_hooks=hooks,
            start_at_layer=layer,
            attention_mask=tile(attention_mask, times),
            shortformer_pos_embed=tile(shortformer, times),
        )
        values = [metric_at(metric, part) for part in final.split(batch)]
        start = i * spec.width + chunk.start
        effects[:, start : start + times] = torch.stack(values, 1) - clean[:, None]
    return effects
