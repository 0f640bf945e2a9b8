"""Token-level baselines: a score per input token for a metric (or any scalar objective).

Gradient methods differentiate with respect to the *input embeddings*: the stream entering block
0, ``hook_embed`` plus ``hook_pos_embed`` for additive (standard) positions. Integrated gradients
integrates from the all-zero input along the straight line, so its scores sum to
``objective(input) - objective(zero input)`` (completeness). Occlusion masks one token at a time
(the exhaustive ground truth of the masking protocols). Pad positions score 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.forward import ResidualInput, final_logits, residual_input
from depass_lens.evaluation.metrics import (
    Metric,
    bind_mask,
    metric_at,
    metric_positions,
    real_mask,
)
from depass_lens.evaluation.registry import TokenTask, token_method
from depass_lens.evaluation.token_level import masked_final_logits
from depass_lens.evaluation.token_masking import Masking, maskable_positions, masking_defaults

#: ``objective(model, resid, forward_kwargs) -> [batch]``: a scalar per prompt, computed by
#: running ``model`` from the residual input ``resid`` (``start_at_layer=0``).
Objective = Callable[[TLModel, Tensor, dict[str, Any]], Float[Tensor, " batch"]]


def metric_objective(metric: Metric, attention_mask: Tensor | None = None) -> Objective:
    """The objective "``metric`` of the logits" (positions counted among ``attention_mask``'s
    real tokens, as :func:`~depass_lens.evaluation.metrics.bind_mask` does)."""
    metric = bind_mask(metric, attention_mask)

    def objective(model: TLModel, resid: Tensor, kwargs: dict[str, Any]) -> Tensor:
        return metric(model(resid, start_at_layer=0, **kwargs))

    return objective


def input_gradient(
    model: TLModel,
    inp: ResidualInput,
    objective: Objective,
    scale: float = 1.0,
) -> Float[Tensor, "batch pos d_model"]:
    """Gradient of ``objective`` (summed over prompts) at the input ``scale * inp.resid``."""
    with torch.enable_grad():
        x = (inp.resid.detach() * scale).requires_grad_(True)
        value = objective(model, x, inp.kwargs())
        (grad,) = torch.autograd.grad(value.sum(), x)
    return grad


def _masked(scores: Tensor, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
    return scores * real_mask(tokens, attention_mask).to(scores.dtype)


# --------------------------------------------------------------- objective-level implementations
def gradient_norm_of(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    objective: Objective,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "batch pos"]:
    grad = input_gradient(model, residual_input(model, tokens, attention_mask), objective)
    return _masked(grad.norm(dim=-1), tokens, attention_mask)


def gradient_x_input_of(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    objective: Objective,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "batch pos"]:
    inp = residual_input(model, tokens, attention_mask)
    grad = input_gradient(model, inp, objective)
    return _masked((grad * inp.resid).sum(-1), tokens, attention_mask)


def path_nodes(
    steps: int, rule: Literal["gausslegendre", "midpoint", "trapezoid"] = "gausslegendre"
) -> tuple[list[float], list[float]]:
    """Points ``alpha`` in [0, 1] and weights for integrating along the straight-line path."""
    if steps < 1 or (rule == "trapezoid" and steps < 2):
        raise ValueError(f"too few steps ({steps}) for the {rule} rule")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return [float(x + 1) / 2 for x in nodes], [float(w) / 2 for w in weights]
    if rule == "midpoint":
        return [(i + 0.5) / steps for i in range(steps)], [1 / steps] * steps
    if rule == "trapezoid":
        w = [1 / (steps - 1)] * steps
        w[0] = w[-1] = 0.5 / (steps - 1)
        return [i / (steps - 1) for i in range(steps)], w
    raise ValueError(f"rule must be 'gausslegendre', 'midpoint' or 'trapezoid', not {rule!r}")


def integrated_gradients_of(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    objective: Objective,
    attention_mask: Tensor | None = None,
    steps: int = 32,
    rule: Literal["gausslegendre", "midpoint", "trapezoid"] = "gausslegendre",
    progress: bool = True,
) -> Float[Tensor, "batch pos"]:
    inp = residual_input(model, tokens, attention_mask)
    alphas, weights = path_nodes(steps, rule)
    total = torch.zeros_like(inp.resid)
    nodes = tqdm(
        list(zip(alphas, weights)), desc="integrated gradients", disable=not progress, delay=2
    )
    for alpha, weight in nodes:
        total += weight * input_gradient(model, inp, objective, scale=alpha)
    return _masked((total * inp.resid).sum(-1), tokens, attention_mask)


@torch.no_grad()
def mean_pattern(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
    layer: int = -1,
) -> Float[Tensor, "batch query key"]:
    """Attention pattern of ``layer``, averaged over heads."""
    name = f"blocks.{layer % make_adapter(model).n_layers}.attn.hook_pattern"
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n == name, attention_mask=attention_mask
    )
    return cache[name].mean(1)


def attention_from(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    query: Int[Tensor, " batch"],
    attention_mask: Tensor | None = None,
    layer: int = -1,
) -> Float[Tensor, "batch pos"]:
    """Head-mean attention of ``layer`` from one query position per prompt."""
    pattern = mean_pattern(model, tokens, attention_mask, layer)
    return pattern[torch.arange(len(tokens)), query.to(pattern.device)]


@torch.no_grad()
def rollout_from(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    query: Int[Tensor, " batch"],
    attention_mask: Tensor | None = None,
    n_layers: int | None = None,
    residual_weight: float = 0.5,
) -> Float[Tensor, "batch pos"]:
    n_layers = make_adapter(model).n_layers if n_layers is None else n_layers
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith("hook_pattern"), attention_mask=attention_mask
    )
    n_pos = tokens.shape[1]
    eye = torch.eye(n_pos, device=tokens.device)
    rollout = eye.expand(len(tokens), n_pos, n_pos)
    for layer in range(n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].mean(1)
        mixed = residual_weight * eye + (1 - residual_weight) * pattern
        rollout = mixed @ rollout.to(mixed.dtype)
    rows = torch.arange(len(tokens))
    return rollout[rows, query.to(tokens.device)]


def seeded_uniform(shape: tuple[int, ...], seed: int) -> Tensor:
    """Uniform [0, 1) scores from a private generator: the same for the same seed."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_token_scores(
    tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None, seed: int
) -> Float[Tensor, "batch pos"]:
    """Seeded uniform scores per token, 0 at pad positions (the token and subspace baseline)."""
    scores = seeded_uniform(tuple(tokens.shape), seed).to(tokens.device)
    return _masked(scores, tokens, attention_mask)


# ---------------------------------------------------------------------- registered signatures
@token_method
def gradient_norm(task: TokenTask) -> Float[Tensor, "batch pos"]:
    """L2 norm of the metric's gradient w.r.t. each input embedding (unsigned)."""
    objective = metric_objective(task.metric, task.attention_mask)
    return gradient_norm_of(task.model, task.tokens, objective, task.attention_mask)


@token_method
def gradient_x_input(task: TokenTask) -> Float[Tensor, "batch pos"]:
    """``<grad, input embedding>`` per token: first-order contribution of each token."""
    objective = metric_objective(task.metric, task.attention_mask)
    return gradient_x_input_of(task.model, task.tokens, objective, task.attention_mask)


@token_method
def integrated_gradients(
    task: TokenTask,
    steps: int = 32,
    rule: Literal["gausslegendre", "midpoint", "trapezoid"] = "gausslegendre",
    progress: bool = True,
) -> Float[Tensor, "batch pos"]:
    """Integrated gradients from the zero embedding (``steps`` backward passes).

    Scores sum to ``metric(input) - metric(zero input)`` up to the quadrature error; with a
    norm layer the path jumps near 0 (``LN(alpha x)`` is constant but for ``eps``), which needs
    many more steps.
    """
    objective = metric_objective(task.metric, task.attention_mask)
    return integrated_gradients_of(
        task.model, task.tokens, objective, task.attention_mask, steps, rule, progress=progress
    )


def _query(task: TokenTask) -> Tensor:
    """Each prompt's metric position."""
    shape = tuple(task.tokens.shape)
    return metric_positions(task.metric, shape, task.attention_mask)  # type: ignore[arg-type]


@token_method
def attention_weights(task: TokenTask, layer: int = -1) -> Float[Tensor, "batch pos"]:
    """Attention from the metric's position in ``layer`` (default: last), mean over heads."""
    return attention_from(task.model, task.tokens, _query(task), task.attention_mask, layer)


@token_method
def attention_rollout(task: TokenTask, residual_weight: float = 0.5) -> Float[Tensor, "batch pos"]:
    """Abnar & Zuidema's rollout: product over layers of ``w I + (1 - w) mean_heads(A)``."""
    return rollout_from(
        task.model, task.tokens, _query(task), task.attention_mask, residual_weight=residual_weight
    )


@token_method
def random_tokens(task: TokenTask, seed: int = 0) -> Float[Tensor, "batch pos"]:
    """Uniform random scores (seeded, so the baseline is reproducible)."""
    return random_token_scores(task.tokens, task.attention_mask, seed)


@token_method
@torch.no_grad()
def occlusion(
    task: TokenTask,
    masking: Masking = "replace",
    fill_id: int | None = None,
    protect_bos: bool | None = None,
    protect_query: bool = True,
    batch_size: int = 256,
) -> Float[Tensor, "batch pos"]:
    """Leave-one-out: ``metric(clean) - metric(token masked)`` for each token, alone.

    The exhaustive token-level ground truth for the masking protocols (same masking and
    protected positions; protected and pad positions score 0).
    """
    model, tokens, attention_mask = task.model, task.tokens, task.attention_mask
    metric = bind_mask(task.metric, attention_mask)
    fill_id, protect_bos = masking_defaults(model, fill_id, protect_bos)
    positions = metric_positions(metric, tuple(tokens.shape), attention_mask)  # type: ignore[arg-type]
    maskable = maskable_positions(
        tokens, attention_mask, positions, protect_bos=protect_bos, protect_query=protect_query
    )
    clean = metric_at(metric, final_logits(model, tokens, positions, attention_mask=attention_mask))
    masks = []
    for j in range(tokens.shape[1]):
        one = torch.zeros_like(maskable)
        one[:, j] = maskable[:, j]
        masks.append(one)
    finals = masked_final_logits(
        model, tokens, masks, positions, masking=masking, fill_id=fill_id,
        attention_mask=attention_mask, batch_size=batch_size,
    )  # fmt: skip
    return torch.stack([clean - metric_at(metric, final) for final in finals], 1)
