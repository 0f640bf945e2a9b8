"""The constant terms of the frozen-linearised model, and each one's share of a target.

With the nonlinear quantities frozen, the model is affine in any start state: ``T(x) = <G, x> + K``.
Adjoint mode reads ``<G, component>`` off one backward pass; ``K`` is what the constants add
(value and output biases, norm biases, ``b_in``/``b_out``, the MLP linearisation's remainder, the
integrated softmax's remainder, ALiBi, ...). Each constant enters the forward pass at one tensor,
so its share is ``<constant, dT/d(that tensor)>`` from the *same* backward pass: a
:class:`ConstantLedger` records every such site as the linearised forward meets it.

Computing ``K`` this way (rather than as ``T - <G, x>``) makes completeness a real check: a path
missing from the gradient, or a constant missing from the ledger, shows up as a gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import MLPWeights, ModelAdapter
from depass_lens.decomposition import compute_dtype
from depass_lens.frozen import Activations
from depass_lens.norms import post_sublayer_norms, through_norms

Owner = Literal["attn", "mlp", "stream", "final"]


@dataclass
class ConstantSite:
    """One constant term: ``constant`` is part of the live tensor ``live`` (broadcast to it).

    ``owner`` says which node's constant it is: a layer's attention, its MLP, the stream itself
    (e.g. ``b_O``, which belongs to no head) or the final read. ``axis``, if set, is kept in the
    contribution: the head axis of attention sites, the neuron axis of dense MLP sites.
    ``rows`` gives the prompt of each row of ``live`` where rows are routed tokens (MoE experts).
    """

    name: str
    hook: str
    owner: Owner
    layer: int
    live: Tensor | None
    constant: Tensor | None
    axis: int | None = None
    rows: Tensor | None = None
    computed: list[Tensor] | None = None  # no live tensor: the backward pass fills this in

    def contribution(self, grad: Tensor | None, batch: int) -> Tensor:
        """``<constant, grad>`` per prompt: ``[batch]``, or ``[batch, n]`` with a kept axis."""
        if self.computed is not None:  # computed during the backward pass (or not reached)
            return self.computed[-1] if self.computed else torch.zeros(batch)
        assert self.live is not None and self.constant is not None
        if grad is None:
            shape = (batch,) if self.axis is None else (batch, self.live.shape[self.axis])
            return self.live.new_zeros(shape)
        wide = compute_dtype(grad.dtype)  # products summed in float32 for half precision
        constant, grad = self.constant.to(wide), grad.to(wide)
        if constant.ndim < grad.ndim:
            constant = constant.reshape((1,) * (grad.ndim - constant.ndim) + constant.shape)
        keep = {0, self.axis % grad.ndim if self.axis is not None else 0}
        broadcast = [
            d
            for d in range(grad.ndim)
            if d not in keep and constant.shape[d] == 1 and grad.shape[d] > 1 and self.rows is None
        ]
        if broadcast:  # sum the gradient over what the constant repeats, before multiplying
            grad = grad.sum(broadcast, keepdim=True)
        product = constant * grad
        if self.rows is not None:
            per_row = product.flatten(1).sum(-1)
            return per_row.new_zeros(batch).index_add_(0, self.rows, per_row)
        if self.axis is not None:
            product = product.movedim(self.axis, 1)
            return product.flatten(2).sum(-1)
        return product.flatten(1).sum(-1)


@dataclass
class ConstantLedger:
    """Every constant site met during one linearised forward pass, in order."""

    sites: list[ConstantSite] = field(default_factory=list)
    enabled: bool = True

    def add(self, site: ConstantSite) -> None:
        if self.enabled:
            self.sites.append(site)

    def live_tensors(self) -> list[Tensor]:
        return [site.live for site in self.sites if site.live is not None]

    def computed(self, name: str, hook: str, owner: Owner, layer: int) -> list[Tensor]:
        """A site whose share the backward pass computes itself: returns the list to append it
        to (``[batch]`` or ``[batch, head]``), the latest entry counting."""
        holder: list[Tensor] = []
        self.add(ConstantSite(name, hook, owner, layer, None, None, computed=holder))
        return holder

    def contributions(
        self, grads: Sequence[Tensor | None], batch: int
    ) -> list[Float[Tensor, "batch *head"]]:
        """Every site's share, given the gradients of :meth:`live_tensors` in order."""
        remaining = iter(grads)
        return [
            site.contribution(None if site.live is None else next(remaining), batch)
            for site in self.sites
        ]

    def total_after(
        self, adapter: ModelAdapter, contributions: Sequence[Tensor], start: str
    ) -> Float[Tensor, " batch"]:
        """What the constants entering after ``start`` add to the target, per prompt."""
        where = adapter.hook_position(start)
        total: Tensor = torch.zeros(())  # a 0-d tensor adds to any device and dtype
        for site, value in zip(self.sites, contributions):
            if adapter.hook_position(site.hook) > where:
                total = total + per_prompt(value).to(compute_dtype(value.dtype))
        return total


def per_prompt(value: Float[Tensor, "batch *n"]) -> Float[Tensor, " batch"]:
    """A site's contribution summed over any kept axis."""
    return value.flatten(1).sum(-1) if value.ndim > 1 else value


# ---------------------------------------------------------------------------- the constants
def value_constant(adapter: ModelAdapter, layer: int) -> Float[Tensor, "kv_head d_head"]:
    """What a head's values get from constants: ``b_V`` plus the input norm's bias through W_V."""
    weights = adapter.attention(layer)
    constant = weights.b_V
    norm = adapter.attention_input_norm(layer)
    if norm is not None and norm.b is not None:
        constant = constant + einops.einsum(norm.b, weights.W_V, "d, h d e -> h e")
    return constant


def mlp_input_constants(
    adapter: ModelAdapter, layer: int, mlp: MLPWeights
) -> tuple[Tensor | None, Tensor | None]:
    """Constants in an MLP's (gate, up) pre-activations: the input norm's bias through the
    input weights, plus ``b_in`` for a plain MLP (a gated MLP adds ``b_in`` after the product)."""
    norms = adapter.block_norms(layer)
    ln2 = None if adapter.post_norm else norms["ln2"]
    bias = ln2.b if ln2 is not None and ln2.kind != "none" else None
    if mlp.W_gate is not None:
        gate = bias @ mlp.W_gate if bias is not None else None
        up = bias @ mlp.W_in if bias is not None else None
        return gate, up
    pre = mlp.b_in if bias is None else mlp.b_in + bias @ mlp.W_in
    return pre, None


def output_constant(
    adapter: ModelAdapter,
    layer: int,
    which: Literal["attn", "mlp"],
    acts: Activations,
    bias: Float[Tensor, "batch pos d_model"],
) -> Float[Tensor, "batch pos d_model"]:
    """A sublayer's output bias (``b_O`` or ``b_out``) as it joins the stream: through the
    post-sublayer norms with their frozen scales, plus those norms' biases."""
    norms = post_sublayer_norms(adapter, layer, which)
    empty = bias.new_zeros(bias.shape[0], 0, *bias.shape[1:])
    return through_norms(acts, norms, empty, bias)[1]
