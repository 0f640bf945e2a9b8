"""Subspace -> input: which input tokens write the reading of a probe direction?

A :class:`Probe` reads ``<direction, activation>`` at a hook (e.g. ``blocks.1.hook_resid_post``)
at one position (counted among real tokens, ``-1`` = last) or averaged over all real positions.
A ranking of input tokens is faithful to the probe if masking its top tokens changes the reading
most: :func:`probe_masking_curve` tracks the mean absolute change of the reading over a masking
grid (higher area = more faithful), and :func:`compare_probe_rankings` does so for several
rankings. The ``probe_*`` functions are the baselines (gradients of the reading w.r.t. the input
embeddings, attention at the probe's layer, random); all share the subspace-method signature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.curves import DEFAULT_GRID, Curve
from depass_lens.evaluation.metrics import real_mask, real_positions
from depass_lens.evaluation.registry import SubspaceTask, subspace_method
from depass_lens.evaluation.token_baselines import (
    Objective,
    attention_from,
    gradient_norm_of,
    gradient_x_input_of,
    integrated_gradients_of,
    mean_pattern,
    random_token_scores,
)
from depass_lens.evaluation.token_masking import (
    Masking,
    mask_tokens,
    maskable_positions,
    masking_defaults,
    top_fraction,
)


@dataclass(frozen=True, eq=False)
class Probe:
    """``<direction, activation[pos]>`` at ``hook`` (a ``[batch pos d]`` activation)."""

    hook: str
    direction: Float[Tensor, " d"]
    pos: int | Literal["all"] = -1

    @classmethod
    def coerce(cls, probe: Probe | Mapping[str, Any]) -> Probe:
        """From a probe or a dict ``{"hook", "direction", "pos"?}`` (e.g. a zoo model's info)."""
        if isinstance(probe, Probe):
            return probe
        direction = torch.as_tensor(probe["direction"], dtype=torch.float64)
        return cls(probe["hook"], direction, probe.get("pos", -1))

    @property
    def layer(self) -> int | None:
        """The block the hook is in (``None`` for hooks outside the blocks)."""
        match = re.match(r"blocks\.(\d+)\.", self.hook)
        return int(match.group(1)) if match else None

    def positions(self, shape: tuple[int, int], attention_mask: Tensor | None) -> Tensor | None:
        """Absolute read position per prompt (``None`` when reading all positions)."""
        return None if self.pos == "all" else real_positions(self.pos, shape, attention_mask)

    def read(
        self,
        activation: Float[Tensor, "batch pos d"],
        attention_mask: Tensor | None = None,
        positions: Int[Tensor, " batch"] | None = None,
    ) -> Float[Tensor, " batch"]:
        """The reading from the hook's activation (``positions`` overrides ``pos``)."""
        values = activation @ self.direction.to(activation)
        if self.pos == "all" and positions is None:
            weight = (
                torch.ones_like(values) if attention_mask is None else attention_mask.to(values)
            )
            return (values * weight).sum(-1) / weight.sum(-1)
        if positions is None:
            positions = self.positions(tuple(values.shape), attention_mask)  # type: ignore[arg-type]
        assert positions is not None
        return values[torch.arange(len(values)), positions.to(values.device)]

    def run(self, model: TLModel, input: Tensor, **kwargs: Any) -> Tensor:
        """The hook's activation, stopping after the hook's block."""
        store: dict[str, Tensor] = {}

        def grab(value: Tensor, hook) -> None:
            store["act"] = value

        stop = None if self.layer is None else self.layer + 1
        if stop is not None and stop >= make_adapter(model).n_layers:
            stop = None
        hooks = [*kwargs.pop("fwd_hooks", []), (self.hook, grab)]
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        model.run_with_hooks(input, fwd_hooks=hooks, stop_at_layer=stop, **kwargs)
        return store["act"]

    def objective(self, attention_mask: Tensor | None) -> Objective:
        """The reading as a gradient-method objective (a function of the residual input)."""

        def objective(model: TLModel, resid: Tensor, kwargs: dict[str, Any]) -> Tensor:
            act = self.run(model, resid, start_at_layer=0, **kwargs)
            return self.read(act, attention_mask)

        return objective


@torch.no_grad()
def probe_reading(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    probe: Probe,
    *,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """The probe's reading on clean prompts."""
    act = probe.run(model, tokens, attention_mask=attention_mask)
    return probe.read(act, attention_mask)


@torch.no_grad()
def probe_masking_curve(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    probe: Probe,
    *,
    attention_mask: Tensor | None = None,
    masking: Masking = "replace",
    fill_id: int | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    protect_bos: bool | None = None,
    protect_query: bool = True,
    by: Literal["signed", "abs"] = "abs",
) -> Curve:
    """Mask the top-ranked tokens and track the reading: ``change`` = mean ``|r - r_clean|``.

    Ranked by ``|score|`` by default: a token that pushes the reading down matters as much as
    one that pushes it up. ``protect_query`` protects the probe's position (not with ``pos="all"``).
    ``relative_change`` is ``mean |r - r_clean| / mean |r_clean|``.
    """
    fill_id, protect_bos = masking_defaults(model, fill_id, protect_bos)
    shape = tuple(tokens.shape)
    positions = probe.positions(shape, attention_mask)  # type: ignore[arg-type]
    query = positions if positions is not None else real_positions(-1, shape, attention_mask)  # type: ignore[arg-type]
    clean = probe_reading(model, tokens, probe, attention_mask=attention_mask)
    maskable = maskable_positions(
        tokens,
        attention_mask,
        query,
        protect_bos=protect_bos,
        protect_query=protect_query and positions is not None,
    )
    curve = Curve(
        "probe disrupt-top",
        [float(f) for f in grid],
        {"relative_change": [], "change": [], "signed_change": [], "reading": []},
        {
            "hook": probe.hook,
            "pos": probe.pos,
            "masking": masking,
            "by": by,
            "clean_reading": float(clean.mean()),
            "clean_abs_reading": float(clean.abs().mean()),
        },
    )
    for fraction in grid:
        masked = top_fraction(scores, maskable, fraction, by)
        run = mask_tokens(
            tokens, masked, masking=masking, fill_id=fill_id, attention_mask=attention_mask
        )
        mapped = None if positions is None else run.map_positions(positions)
        act = probe.run(model, run.tokens, fwd_hooks=run.hooks(), **run.kwargs())
        reading = probe.read(act, run.attention_mask, mapped)
        change = float((reading - clean).abs().mean())
        curve.values["relative_change"].append(change / max(float(clean.abs().mean()), 1e-12))
        curve.values["change"].append(change)
        curve.values["signed_change"].append(float((reading - clean).mean()))
        curve.values["reading"].append(float(reading.mean()))
    return curve


def compare_probe_rankings(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    rankings: Mapping[str, Float[Tensor, "batch pos"]],
    probe: Probe,
    **options: Any,
) -> dict[str, Curve]:
    """:func:`probe_masking_curve` for each named ranking (compare their ``change`` areas)."""
    return {
        name: probe_masking_curve(model, tokens, scores, probe, **options)
        for name, scores in rankings.items()
    }


# ------------------------------------------------------------------------------ baselines
@subspace_method
def probe_gradient_norm(task: SubspaceTask) -> Float[Tensor, "batch pos"]:
    """Norm of the reading's gradient w.r.t. each input embedding."""
    objective = task.probe.objective(task.attention_mask)
    return gradient_norm_of(task.model, task.tokens, objective, task.attention_mask)


@subspace_method
def probe_gradient_x_input(task: SubspaceTask) -> Float[Tensor, "batch pos"]:
    """Gradient x input of the reading."""
    objective = task.probe.objective(task.attention_mask)
    return gradient_x_input_of(task.model, task.tokens, objective, task.attention_mask)


@subspace_method
def probe_integrated_gradients(
    task: SubspaceTask,
    steps: int = 32,
    rule: Literal["gausslegendre", "midpoint", "trapezoid"] = "gausslegendre",
) -> Float[Tensor, "batch pos"]:
    """Integrated gradients of the reading from the zero input."""
    objective = task.probe.objective(task.attention_mask)
    return integrated_gradients_of(
        task.model, task.tokens, objective, task.attention_mask, steps, rule
    )


@subspace_method
def probe_attention(task: SubspaceTask) -> Float[Tensor, "batch pos"]:
    """Head-mean attention from the probe's position in the last layer at or before the hook."""
    model, tokens, probe, attention_mask = task.model, task.tokens, task.probe, task.attention_mask
    layer = make_adapter(model).n_layers - 1 if probe.layer is None else probe.layer
    if probe.hook.endswith("hook_resid_pre"):
        layer -= 1
    if layer < 0:
        raise ValueError(f"no attention layer before {probe.hook}")
    shape = tuple(tokens.shape)
    if probe.pos != "all":
        query = probe.positions(shape, attention_mask)  # type: ignore[arg-type]
        return attention_from(model, tokens, query, attention_mask, layer)  # type: ignore[arg-type]
    pattern = mean_pattern(model, tokens, attention_mask, layer)
    real = real_mask(tokens, attention_mask).to(pattern)
    return einops.einsum(pattern, real, "b q k, b q -> b k") / real.sum(-1, keepdim=True)


@subspace_method
def probe_random(task: SubspaceTask, seed: int = 0) -> Float[Tensor, "batch pos"]:
    """Uniform random scores (seeded)."""
    return random_token_scores(task.tokens, task.attention_mask, seed)
