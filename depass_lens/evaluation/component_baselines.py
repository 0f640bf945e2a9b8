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
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.forward import final_logits, resid_pre, tile
from depass_lens.evaluation.levels import (
    Hook,
    Level,
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
from depass_lens.evaluation.token_baselines import seeded_uniform


def _acts_and_grads(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    spec: LevelSpec,
    attention_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Clean activations and the metric's gradient at them, as ``[batch pos n_comp width]``."""
    store: dict[int, Tensor] = {}

    def keeper(layer: int):
        def keep(value: Tensor, hook) -> Tensor:
            store[layer] = value
            return value  # what flows on is what we differentiate at (on either backend)

        return keep

    hooks: list[Hook] = [(spec.hook_name(layer), keeper(layer)) for layer in spec.layers]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=attention_mask)
        grads = torch.autograd.grad(metric(logits).sum(), [store[k] for k in spec.layers])
    acts = spec.stack({k: store[k].detach() for k in spec.layers})
    return acts, spec.stack(dict(zip(spec.layers, grads)))


def _sum_over_positions(
    x: Float[Tensor, "batch pos n_comp width"], tokens: Tensor, attention_mask: Tensor | None
) -> Float[Tensor, "batch n_comp"]:
    weight = real_mask(tokens, attention_mask).to(x.dtype)
    return einops.einsum(x, weight, "b p c w, b p -> b c")


def _first_order(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    level: Level,
    attention_mask: Tensor | None,
    step: Callable[[LevelSpec, Tensor], Tensor],
) -> Float[Tensor, "batch n_comp"]:
    """``step(spec, a_clean) . dmetric/da`` summed over real positions (the gradient family).

    ``step`` is the activation change the method weighs by the gradient: ``a_corrupt - a_clean``
    for attribution patching, ``a_clean - 0`` for gradient x activation.
    """
    spec = resolve_level(model, level)
    metric = bind_mask(metric, attention_mask)
    clean, grad = _acts_and_grads(model, tokens, metric, spec, attention_mask)
    return _sum_over_positions(step(spec, clean) * grad, tokens, attention_mask)


def attribution_patching(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    level: Level,
    corrupted_tokens: Tensor | None = None,
    reference_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "batch n_comp"]:
    """AtP (Nanda; Kramar et al.): ``(a_corrupt - a_clean) . dmetric/da`` over positions.

    First-order estimate of the patching effect ``metric(patched) - metric(clean)``, from one
    clean forward and backward pass and one corrupted forward pass.
    """
    if corrupted_tokens is None:
        raise ValueError("attribution patching needs corrupted_tokens")

    def patch(spec: LevelSpec, clean: Tensor) -> Tensor:
        corrupt = component_activations(model, spec, corrupted_tokens, attention_mask)
        return spec.stack(corrupt) - clean

    return _first_order(model, tokens, metric, level, attention_mask, patch)


def gradient_x_activation(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    level: Level,
    corrupted_tokens: Tensor | None = None,
    reference_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "batch n_comp"]:
    """``a . dmetric/da`` over positions: first-order ``metric(clean) - metric(zero-ablated)``."""
    return _first_order(model, tokens, metric, level, attention_mask, lambda _, clean: clean)


@torch.no_grad()
def activation_norm(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    level: Level,
    corrupted_tokens: Tensor | None = None,
    reference_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    positions: Literal["metric", "all"] = "metric",
) -> Float[Tensor, "batch n_comp"]:
    """Norm of each component's activation (``z`` of a head, ``|post|`` of a neuron).

    ``positions="metric"``: at the metric's position; ``"all"``: over all real positions.
    """
    spec = resolve_level(model, level)
    stacked = spec.stack(component_activations(model, spec, tokens, attention_mask))
    if positions == "metric":
        query = metric_positions(metric, tuple(tokens.shape), attention_mask)  # type: ignore[arg-type]
        return stacked[torch.arange(len(tokens)), query].norm(dim=-1)
    if positions == "all":
        return _sum_over_positions(stacked.pow(2), tokens, attention_mask).sqrt()
    raise ValueError(f"positions must be 'metric' or 'all', not {positions!r}")


def random_components(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    level: Level,
    corrupted_tokens: Tensor | None = None,
    reference_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    seed: int = 0,
) -> Float[Tensor, "batch n_comp"]:
    """Uniform random scores (seeded)."""
    spec = resolve_level(model, level)
    return seeded_uniform((len(tokens), spec.n_comp), seed).to(tokens.device)


def _one_hot_rows(chunk: range, batch: int, n_comp: int, offset: int) -> Bool[Tensor, "rows n"]:
    """``(m b)`` rows; the rows of replica ``j`` mask component ``offset + chunk[j]``."""
    mask = torch.zeros(len(chunk), batch, n_comp, dtype=torch.bool)
    for j, index in enumerate(chunk):
        mask[j, :, offset + index] = True
    return einops.rearrange(mask, "m b n -> (m b) n")


@torch.no_grad()
def exact_ablation(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    level: Level,
    corrupted_tokens: Tensor | None = None,
    reference_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
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
    spec = resolve_level(model, level)
    metric = bind_mask(metric, attention_mask)
    batch = len(tokens)
    fills = ablation_fills(
        model,
        spec,
        ablation,
        tokens=tokens,
        attention_mask=attention_mask,
        reference_tokens=reference_tokens,
        corrupted_tokens=corrupted_tokens,
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
