"""Each receiver's input gradient in the stream's space, formed one block at a time.

An edge ``A -> B`` scores ``sum_pos <out_A, g_B>``, with ``g_B`` the target's gradient at what
``B`` reads from the stream (before its own norm). A head's query, key or value input is reached
through its projection: the gradient at ``attn.hook_q``/``hook_k``/``hook_v`` (``[batch pos head
d_head]``) times the head's ``W_Q``/``W_K``/``W_V``, pulled back through the attention's input
norm; an MLP's neuron group likewise through its neurons' input weights and ``ln2``. So the
backward pass keeps ``d_head``-wide gradients only, and a layer's ``[batch pos head d_model]``
block exists while its edges are contracted, where TransformerLens's ``use_split_qkv_input``
would carry a ``d_model``-wide copy of the stream per head and side through the whole pass.

The norm's map is the one the backward pass went through: the frozen norm (the linearised model),
its exact Jacobian (the real model, for gradient baselines), or its secant between the clean and
the corrupted run (the difference linearisation, ``reference`` holding the corrupted run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter, NormWeights
from depass_lens.circuits.spec import HEAD_SIDES, GraphSpec, target_read_hook
from depass_lens.difference import secant_coefficient, secant_norm_transpose
from depass_lens.frozen import Activations
from depass_lens.qk import AttentionSplit


def projects_heads(adapter: ModelAdapter, split: AttentionSplit | None, linearise: bool) -> bool:
    """Whether heads' input gradients can be read at their projections.

    Always for the real model and for frozen patterns. A pattern-side split rebuilds the scores
    from TransformerLens's own final queries and keys where every layer exposes them (then every
    gradient into a head's input passes its projection); elsewhere it reads the attention input
    itself, and the graph runs on per-head copies of the stream instead."""
    if not linearise or split is None or not split.uses_pattern:
        return True
    layers = range(adapter.n_layers)
    return all(adapter.final_query_key_hooks(layer) is not None for layer in layers)


def head_gradient_hook(layer: int, side: str, projected: bool) -> str:
    """Where the backward pass leaves a layer's heads' gradient for one side."""
    if projected:
        return f"blocks.{layer}.attn.hook_{side}"
    return f"blocks.{layer}.hook_{side}_input"


def receiver_hooks(
    adapter: ModelAdapter, spec: GraphSpec, target_hook: str, projected: bool
) -> list[str]:
    """Hooks whose gradients give every receiver's input gradient."""
    names: set[str] = set()
    for node in spec.nodes:
        if node.kind == "head":
            names |= {head_gradient_hook(node.layer, side, projected) for side in HEAD_SIDES}
        elif node.kind == "mlp":
            names.add(f"blocks.{node.layer}.hook_mlp_in")
        elif node.kind == "neurons":
            names |= {f"blocks.{node.layer}.hook_mlp_in", f"blocks.{node.layer}.mlp.hook_pre"}
            if adapter.mlp(node.layer).gated:
                names.add(f"blocks.{node.layer}.mlp.hook_pre_linear")
    names.add(target_read_hook(adapter, target_hook))
    return sorted(names)


def norm_stats(norm: NormWeights | None) -> list[str]:
    """A norm's scale and normalised value hooks (what pulling back through it reads)."""
    if norm is None or norm.kind == "none" or norm.scale_hook is None:
        return []
    return [norm.scale_hook, norm.scale_hook.removesuffix(".hook_scale") + ".hook_normalized"]


def head_input_stats(adapter: ModelAdapter, spec: GraphSpec) -> list[str]:
    """The attention input norms' statistics of every layer with heads in ``spec``."""
    layers = sorted({node.layer for node in spec.nodes if node.kind == "head"})
    return [name for layer in layers for name in norm_stats(adapter.attention_input_norm(layer))]


def head_gradients(
    adapter: ModelAdapter,
    layer: int,
    side: str,
    grads: Mapping[str, Tensor | None],
    acts: Activations,
    reference: Activations | None = None,
    exact: bool = False,
) -> Float[Tensor, "batch pos head d_model"] | None:
    """Every head's input gradient for one side of ``layer``, from the gradient at its
    projection (``None`` where the target does not depend on that side)."""
    grad = grads.get(f"blocks.{layer}.attn.hook_{side}")
    if grad is None:
        return None
    weight = adapter.head_projections(layer)[side].to(grad.dtype)
    norm = adapter.attention_input_norm(layer)
    fused = _through_shared_norm(grad, weight, norm, acts, reference, exact)
    if fused is not None:
        return fused
    pulled = einops.einsum(grad, weight, "b p h e, h d e -> b p h d")
    return pull_through_norm(pulled, norm, acts, reference, exact)


def _through_shared_norm(
    grad: Float[Tensor, "batch pos head e"],
    weight: Float[Tensor, "head d e"],
    norm: NormWeights | None,
    acts: Activations,
    reference: Activations | None,
    exact: bool,
) -> Float[Tensor, "batch pos head d"] | None:
    """:func:`pull_through_norm` of ``grad`` times the heads' projections, with the norm folded
    into the product: the norm's weight and centring into the projection, its scale into the
    ``d_head``-wide gradient, and the secant's rank-one term as one in-place update. One
    ``[batch pos head d_model]`` tensor is written once, where the unfused map makes and reads
    several. ``None`` (use the unfused map) without a norm, for per-head statistics, or where
    dtypes differ (half-precision models divide in their float32 scale's dtype)."""
    names = norm_stats(norm)
    if not names or norm is None:
        return None
    scale_x, normalized_x = acts[names[0]], acts[names[1]]
    if (
        scale_x.ndim != grad.ndim - 1
        or scale_x.dtype != grad.dtype
        or normalized_x.dtype != grad.dtype
    ):
        return None
    folded = weight * norm.w.to(weight.dtype)[None, :, None] if norm.w is not None else weight
    centred = folded - folded.mean(1, keepdim=True) if norm.centres else folded
    out = einops.einsum(grad / scale_x.unsqueeze(-1), centred, "b p h e, h d e -> b p h d")
    if reference is None and not exact:  # the frozen norm: weight, centre, divide
        return out
    other = acts if reference is None else reference  # exact: the secant of a run with itself
    scale_y, normalized_y = (other[name].to(grad.dtype) for name in names)
    coef = secant_coefficient(normalized_x, scale_x, normalized_y, scale_y) / scale_x
    if norm.centres:
        coef = coef - coef.mean(-1, keepdim=True)
    # <w * pulled, n_y> per head, from the d_head-wide gradient
    along = einops.einsum(folded, normalized_y, "h d e, b p d -> b p h e")
    dot = (grad * along).sum(-1)
    return out.addcmul_(coef.unsqueeze(2), dot.unsqueeze(-1), value=-1)


def neuron_gradients(
    adapter: ModelAdapter,
    layer: int,
    groups: Sequence[tuple[int, ...] | None],
    grads: Mapping[str, Tensor | None],
    acts: Activations,
    reference: Activations | None = None,
) -> Float[Tensor, "group batch pos d_model"] | None:
    """Each neuron group's input gradient: its neurons' pre-activation gradients pulled back
    through their input weights and the input norm's map. A ``None`` group is the rest of the
    layer; ``None`` comes back where the target does not depend on the layer's MLP. The groups'
    gradients add up to the MLP input's."""
    mlp = adapter.mlp(layer)
    prefix = f"blocks.{layer}.mlp"
    chosen = {n for group in groups if group is not None for n in group}
    rest = tuple(n for n in range(adapter.d_mlp) if n not in chosen)
    norms = adapter.block_norms(layer)
    ln2 = None if adapter.post_norm else norms["ln2"]
    out = []
    gate, up = grads.get(f"{prefix}.hook_pre"), grads.get(f"{prefix}.hook_pre_linear")
    like = gate if gate is not None else up
    if like is None:
        return None
    for group in groups:
        neurons = list(rest if group is None else group)
        pulled = like.new_zeros(*like.shape[:-1], adapter.d_model)
        if gate is not None:  # the gate side reads W_gate (gated MLPs), else W_in
            W = mlp.W_gate if mlp.W_gate is not None else mlp.W_in
            pulled = pulled + gate[..., neurons] @ W[:, neurons].T
        if up is not None and mlp.W_gate is not None:
            pulled = pulled + up[..., neurons] @ mlp.W_in[:, neurons].T
        out.append(pull_through_norm(pulled, ln2, acts, reference))
    return torch.stack(out)


def pull_through_norm(
    grad: Float[Tensor, "batch pos *head d"],
    norm: NormWeights | None,
    acts: Activations,
    reference: Activations | None = None,
    exact: bool = False,
) -> Float[Tensor, "batch pos *head d"]:
    """A gradient at a norm's output pulled back to its input: through the frozen norm, its exact
    Jacobian (``exact``: the real model), or (``reference``: the corrupted run) its secant."""
    names = norm_stats(norm)
    if not names:
        return grad
    assert norm is not None
    per_head = acts[names[0]].ndim == grad.ndim - 1  # a per-head axis on the gradient only

    def read(source: Activations, name: str) -> Tensor:
        return source[name].unsqueeze(2) if per_head else source[name]

    scale = read(acts, names[0])
    if reference is None and not exact:  # the frozen map's transpose: weight, centre, divide
        weighted = grad * norm.w if norm.w is not None else grad
        if norm.centres:  # the centring projection is symmetric
            weighted = weighted - weighted.mean(-1, keepdim=True)
        return (weighted / scale).to(grad.dtype)  # divided in the wider dtype (float32 scale)
    other = acts if reference is None else reference  # exact: the secant of a run with itself
    n_x, s_x, n_y, s_y = (
        t.to(grad.dtype)
        for t in (read(acts, names[1]), scale, read(other, names[1]), read(other, names[0]))
    )
    return secant_norm_transpose(grad, n_x, s_x, n_y, s_y, norm)
