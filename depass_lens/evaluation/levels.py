"""Component levels ("heads", "neurons", ("neurons", layer)): hooks, ordering, ablation masks.

Components are numbered layer-major: head ``h`` of layer ``l`` is ``l * n_heads + h`` (read at
``blocks.l.attn.hook_z``); neuron ``n`` of layer ``l`` is ``l * d_mlp + n`` (``mlp.hook_post``).
``("neurons", l)`` numbers one layer's neurons ``0 .. d_mlp - 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.metrics import real_mask

Level = Literal["heads", "neurons"] | tuple[str, int]
Hook = tuple[str | Callable, Callable]


@dataclass(frozen=True)
class LevelSpec:
    """Which activations a level's components are, and how they are numbered."""

    kind: Literal["heads", "neurons"]
    layers: tuple[int, ...]
    width: int  # components per layer

    @property
    def suffix(self) -> str:
        return "attn.hook_z" if self.kind == "heads" else "mlp.hook_post"

    @property
    def n_comp(self) -> int:
        return len(self.layers) * self.width

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.suffix}"

    def labels(self) -> list[str]:
        """``L1H2`` / ``L0N5`` style names, in component order."""
        letter = "H" if self.kind == "heads" else "N"
        return [f"L{layer}{letter}{i}" for layer in self.layers for i in range(self.width)]

    def stack(self, acts: dict[int, Tensor]) -> Float[Tensor, "batch pos n_comp width"]:
        """``{layer: activation}`` joined along the component axis (a neuron has width 1)."""
        parts = [acts[layer] for layer in self.layers]
        if self.kind == "neurons":
            parts = [p.unsqueeze(-1) for p in parts]
        return torch.cat(parts, dim=2)

    def per_layer(self, flat: Tensor) -> dict[int, Tensor]:
        """Split a ``[..., n_comp]`` tensor into ``{layer: [..., width]}``."""
        split = einops.rearrange(flat, "... (l w) -> l ... w", l=len(self.layers))
        return dict(zip(self.layers, split))


def resolve_level(model: TLModel, level: Level) -> LevelSpec:
    """Check ``level`` against the model and describe it."""
    adapter = make_adapter(model)
    if level == "heads":
        return LevelSpec("heads", tuple(range(adapter.n_layers)), adapter.n_heads)
    if level == "neurons" or (isinstance(level, tuple) and level and level[0] == "neurons"):
        if adapter.attn_only or not adapter.d_mlp:
            raise ValueError("this model is attention-only: it has no MLP neurons")
        if adapter.is_moe:
            raise ValueError("mixture-of-experts MLPs have no single mlp.hook_post per layer")
        if level == "neurons":
            return LevelSpec("neurons", tuple(range(adapter.n_layers)), adapter.d_mlp)
        layer = int(level[1])  # type: ignore[index]
        if not -adapter.n_layers <= layer < adapter.n_layers:
            raise ValueError(f"layer {layer} out of range for {adapter.n_layers} layers")
        return LevelSpec("neurons", (layer % adapter.n_layers,), adapter.d_mlp)
    raise ValueError(f"level must be 'heads', 'neurons' or ('neurons', layer), not {level!r}")


def _broadcast(mask: Bool[Tensor, "rows width"], kind: str) -> Tensor:
    return mask[:, None, :, None] if kind == "heads" else mask[:, None, :]


@dataclass(frozen=True)
class Fills:
    """What ablated components become, per layer.

    ``values[layer]`` broadcasts against the activation without its batch axis (``[width ...]``,
    one mean per component; ``[pos width ...]``, per position), or, with ``per_prompt``, has the
    batch axis first (``[batch pos width ...]``: corrupted activations, for patching).
    """

    values: dict[int, Tensor]
    per_prompt: bool = False

    def repeat(self, times: int) -> Fills:
        """For a batch repeated ``times`` in ``(m b)`` order."""
        if not self.per_prompt:
            return self
        tiled = {k: einops.repeat(v, "b ... -> (m b) ...", m=times) for k, v in self.values.items()}
        return Fills(tiled, True)


def ablation_hooks(
    spec: LevelSpec, mask: Bool[Tensor, "rows n_comp"], fills: Fills | None = None
) -> list[Hook]:
    """Hooks replacing the masked components (per row) by zero (``fills=None``) or a fill."""
    hooks: list[Hook] = []
    for layer, chosen in spec.per_layer(mask).items():
        if chosen.any():
            fill = None if fills is None else fills.values[layer]
            hooks.append((spec.hook_name(layer), _replacer(_broadcast(chosen, spec.kind), fill)))
    return hooks


def _replacer(where: Tensor, fill: Tensor | None) -> Callable:
    def hook(value: Tensor, hook) -> Tensor:
        new = value.new_zeros(()) if fill is None else fill.to(value)
        return torch.where(where.to(value.device), new, value)

    return hook


@torch.no_grad()
def component_activations(
    model: TLModel,
    spec: LevelSpec,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
) -> dict[int, Tensor]:
    """Each layer's activations at the level's hook (``[batch pos width ...]``)."""
    names = {spec.hook_name(layer) for layer in spec.layers}
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n in names, attention_mask=attention_mask
    )
    return {layer: cache[spec.hook_name(layer)] for layer in spec.layers}


def component_means(
    model: TLModel,
    spec: LevelSpec,
    reference_tokens: Int[Tensor, "ref pos"],
    attention_mask: Tensor | None = None,
    over: Literal["all", "batch"] = "all",
) -> dict[int, Tensor]:
    """Mean activation of every component over a reference set, for mean-ablation.

    ``over="all"``: one mean per component, over prompts and real positions (what the zoo's
    ground truth uses). ``over="batch"``: one mean per component and position, over prompts
    (templated tasks whose positions align; the reference must have the batch's length).
    """
    acts = component_activations(model, spec, reference_tokens, attention_mask)
    weight = real_mask(reference_tokens, attention_mask).to(next(iter(acts.values())).dtype)
    means = {}
    for layer, act in acts.items():
        w = weight.view(*weight.shape, *([1] * (act.ndim - 2)))
        if over == "all":
            means[layer] = (act * w).sum((0, 1)) / w.sum((0, 1)).clamp_min(1)
        elif over == "batch":
            means[layer] = (act * w).sum(0) / w.sum(0).clamp_min(1)
        else:
            raise ValueError(f"over must be 'all' or 'batch', not {over!r}")
    return means


def ablation_fills(
    model: TLModel,
    spec: LevelSpec,
    ablation: str,
    *,
    tokens: Tensor,
    attention_mask: Tensor | None = None,
    reference_tokens: Tensor | None = None,
    corrupted_tokens: Tensor | None = None,
    mean_over: Literal["all", "batch"] = "all",
) -> Fills | None:
    """What an ablated component becomes: ``None`` (zero), its mean, or its corrupted value."""
    if ablation == "zero":
        return None
    if ablation == "mean":
        if reference_tokens is None:
            return Fills(component_means(model, spec, tokens, attention_mask, mean_over))
        return Fills(component_means(model, spec, reference_tokens, None, mean_over))
    if ablation == "patch":
        if corrupted_tokens is None:
            raise ValueError("patching needs corrupted_tokens")
        acts = component_activations(model, spec, corrupted_tokens, attention_mask)
        return Fills(acts, per_prompt=True)
    raise ValueError(f"ablation must be 'zero', 'mean' or 'patch', not {ablation!r}")


def ranked_mask(
    order: Int[Tensor, "rows n_comp"], counts: Int[Tensor, " rows"] | Sequence[int]
) -> Bool[Tensor, "rows n_comp"]:
    """True at the first ``counts[r]`` entries of ``order[r]`` (a ranking of components)."""
    counts = torch.as_tensor(counts, device=order.device).view(-1, 1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank < counts
