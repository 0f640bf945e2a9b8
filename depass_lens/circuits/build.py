"""Computing a circuit graph: one linearised forward, one backward per target, one contraction.

The linearised forward runs on TransformerLens's split inputs (a query, key and value input per
head, an input per MLP), so one backward pass gives the gradient of the target through every
receiver's input, ``g_B``. Each edge is then ``e(A -> B) = sum_pos <out_A, g_B>``: a batched
contraction of every sender's output with every receiver's gradient, receiver group by receiver
group (a receiver's senders are exactly those written before it reads). Node scores, node inputs
and each node's own constants come from the same backward pass, independently of the edges, so
the graph's conservation laws are checks, not identities.

The same machinery with the real (not linearised) model, or averaged over inputs interpolated from
a corrupted prompt, gives the gradients of edge attribution patching and EAP-IG
(:mod:`depass_lens.evaluation.circuit_baselines`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapter import ModelAdapter
from depass_lens.adjoint import AdjointPass, linearised_forward, target_scalar
from depass_lens.circuits.graph import Graph
from depass_lens.circuits.receivers import (
    head_gradient_hook,
    head_gradients,
    head_input_stats,
    neuron_gradients,
    projects_heads,
    receiver_hooks,
)
from depass_lens.circuits.spec import (
    HEAD_SIDES,
    Edge,
    EdgeKind,
    GraphNodes,
    GraphSpec,
    build_spec,
    check_contrast_alignment,
    sender_hooks,
    sender_layers,
    sender_outputs,
    target_read_hook,
)
from depass_lens.constants import ConstantLedger, per_prompt
from depass_lens.decomposition import compute_dtype, tolerance
from depass_lens.difference import (
    check_difference_supported,
    difference_outputs,
    drop_rebuildable_patterns,
    norm_statistics,
    reference_hooks,
)
from depass_lens.errors import DePassInputError, LosslessnessError
from depass_lens.frozen import frozen_activations
from depass_lens.memory import free_memory
from depass_lens.norms import post_sublayer_norms
from depass_lens.qk import AttentionSplit
from depass_lens.rules import TaylorRule
from depass_lens.targets import Target, TargetContext


@dataclass(frozen=True)
class Slot:
    """One receiving input: a node and the side it reads through, with its edges' range.

    Its senders are the first ``n_senders`` senders (senders are listed in the order they write).
    """

    receiver: int
    kind: EdgeKind
    n_senders: int
    first_edge: int


def slots(spec: GraphSpec) -> list[Slot]:
    """The receiving inputs of ``spec`` in edge order (each edge belongs to exactly one)."""
    out: list[Slot] = []
    senders = spec.senders
    start = 0
    edges = spec.edges
    for i in range(1, len(edges) + 1):
        if i == len(edges) or (edges[i].receiver, edges[i].kind) != (
            edges[start].receiver,
            edges[start].kind,
        ):
            run = [e.sender for e in edges[start:i]]
            if run != senders[: len(run)]:
                raise AssertionError("a receiver's senders must be the first senders in order")
            out.append(Slot(edges[start].receiver, edges[start].kind, len(run), start))
            start = i
    return out


def sender_score_hook(adapter: ModelAdapter, spec: GraphSpec, node: int) -> str:
    """The residual hook right after a sender's output joins the stream."""
    n = spec.nodes[node]
    if n.kind in ("embed", "token"):
        return "blocks.0.hook_resid_pre"
    if n.kind in ("head", "bias"):
        return adapter.after_attention_hook(n.layer)
    return f"blocks.{n.layer}.hook_resid_post"


def receiver_input_hook(adapter: ModelAdapter, spec: GraphSpec, node: int) -> str:
    """The residual hook holding what a receiver reads (before its own norm)."""
    n = spec.nodes[node]
    if n.kind == "head":
        return f"blocks.{n.layer}.hook_resid_pre"
    if n.kind in ("mlp", "neurons"):
        if adapter.parallel:
            return f"blocks.{n.layer}.hook_resid_pre"
        return f"blocks.{n.layer}.hook_resid_mid"
    return target_read_hook(adapter, spec.target_hook)


@dataclass
class SlotBlock:
    """Receiving inputs that read the same stream; ``gradients()`` forms their gradients side by
    side (``[batch, pos, k, d_model]``) when called, ``None`` where all are zero (e.g. queries and
    keys with frozen patterns). ``slots`` index the slot list. Formed on demand, one block's
    gradients exist at a time while a graph is contracted."""

    slots: list[int]
    gradients: Callable[[], Float[Tensor, "batch pos k d_model"] | None]

    @classmethod
    def holding(cls, slots: list[int], grads: Tensor | None) -> SlotBlock:
        """A block whose gradients are already formed."""
        return cls(slots, partial(_given, grads))


def slot_blocks(
    adapter: ModelAdapter,
    spec: GraphSpec,
    the_slots: Sequence[Slot],
    grads: Mapping[str, Tensor | None],
    acts: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None = None,
    *,
    projected: bool = True,
    exact: bool = False,
) -> list[SlotBlock]:
    """Every receiving input's gradient in the stream's space, grouped by what it reads: a
    layer's heads per side, an MLP or its neuron groups, the target.

    ``projected``: heads' gradients come from their projections (:mod:`.receivers`), else from
    per-head copies of the stream (``blocks.L.hook_q_input``, ...). ``reference``: the corrupted
    run's activations, under the difference linearisation (norms are pulled back through their
    secants); ``exact``: the real model's norms (gradient baselines)."""
    index = {(s.receiver, s.kind): i for i, s in enumerate(the_slots)}
    blocks = []
    for layer in range(adapter.n_layers):
        heads = [i for i, n in enumerate(spec.nodes) if n.kind == "head" and n.layer == layer]
        for side in HEAD_SIDES if heads else ():
            members = [index[(h, side)] for h in heads]
            if projected:
                load = partial(head_gradients, adapter, layer, side, grads, acts, reference, exact)
            else:
                load = partial(grads.get, head_gradient_hook(layer, side, projected=False))
            blocks.append(SlotBlock(members, load))
        members = [
            i for i, n in enumerate(spec.nodes) if n.layer == layer and n.kind in ("mlp", "neurons")
        ]
        if not members:
            continue
        if len(members) == 1:
            grad = _unsqueeze(grads.get(f"blocks.{layer}.hook_mlp_in"))
            blocks.append(SlotBlock.holding([index[(members[0], "mlp")]], grad))
        else:
            neurons = [spec.nodes[i].neurons for i in members]
            load = partial(_neuron_block, adapter, layer, neurons, grads, acts, reference)
            blocks.append(SlotBlock([index[(i, "mlp")] for i in members], load))
    grad = _unsqueeze(grads.get(target_read_hook(adapter, spec.target_hook)))
    blocks.append(SlotBlock.holding([index[(spec.target, "direct")]], grad))
    return blocks


def _given(grad: Tensor | None) -> Tensor | None:
    return grad


def _neuron_block(*args) -> Tensor | None:
    stacked = neuron_gradients(*args)
    return None if stacked is None else stacked.permute(1, 2, 0, 3)


def _unsqueeze(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.unsqueeze(2)


def contract(
    spec: GraphSpec,
    the_slots: Sequence[Slot],
    blocks: Sequence[SlotBlock],
    outputs: Float[Tensor, "sender batch pos d_model"],
    by_position: bool = False,
) -> Tensor:
    """Edge scores ``sum_pos <out_A, g_B>`` for every edge: ``[batch, edge]`` (or ``[batch, edge,
    pos]``), one batched contraction per block (its inputs share their senders)."""
    return edges_and_inputs(None, spec, the_slots, blocks, outputs, None, by_position)[0]


def edges_and_inputs(
    adapter: ModelAdapter | None,
    spec: GraphSpec,
    the_slots: Sequence[Slot],
    blocks: Sequence[SlotBlock],
    outputs: Float[Tensor, "sender batch pos d_model"],
    stream: Mapping[str, Tensor] | None,
    by_position: bool = False,
    rows: slice | None = None,
) -> tuple[Tensor, Float[Tensor, "batch node"]]:
    """Edge scores (:func:`contract`) and, given the ``stream`` each receiver reads (or its
    change, in a contrast), every receiver's input score ``<in_B, g_B>``; each block's gradients
    are formed once and dropped before the next block's. ``rows``: ``outputs`` holds the senders
    ``spec.senders[rows]`` only, and only their edges are scored (the others stay 0)."""
    batch, n_pos = outputs.shape[1], outputs.shape[2]
    shape = (batch, len(spec.edges), n_pos) if by_position else (batch, len(spec.edges))
    scores = outputs.new_zeros(shape)
    inputs = outputs.new_zeros(batch, len(spec.nodes))
    pattern = "b p k d, a b p d -> b k a p" if by_position else "b p k d, a b p d -> b k a"
    start = 0 if rows is None else rows.start
    for block in blocks:
        stop = min(the_slots[block.slots[0]].n_senders, start + outputs.shape[0])
        if stop <= start and stream is None:
            continue  # none of these senders is written before this block reads
        grads = block.gradients()
        if grads is None:
            continue
        if stop > start:
            part = einops.einsum(grads, outputs[: stop - start].to(grads.dtype), pattern)
            for j, slot in enumerate(block.slots):
                first = the_slots[slot].first_edge
                scores[:, first + start : first + stop] = part[:, j]
        if stream is not None:
            assert adapter is not None
            receivers = [the_slots[i].receiver for i in block.slots]
            read = stream[receiver_input_hook(adapter, spec, receivers[0])].to(grads.dtype)
            values = einops.einsum(read, grads, "b p d, b p k d -> b k").to(inputs.dtype)
            inputs.index_add_(1, torch.tensor(receivers, device=inputs.device), values)
    return scores, inputs


@dataclass
class NodeQuantities:
    """Per node: its score ``<out, h>``, its input's score ``<in, g>``, its own constants."""

    score: Float[Tensor, "batch node"]
    inputs: Float[Tensor, "batch node"]
    own: Float[Tensor, "batch node"]


def sender_scores(
    adapter: ModelAdapter,
    spec: GraphSpec,
    outputs: Float[Tensor, "sender batch pos d_model"],
    sender_grads: Mapping[str, Tensor],
    rows: slice | None = None,
) -> Float[Tensor, "batch node"]:
    """Each sender's score ``<out_A, h_A>`` (of the senders ``spec.senders[rows]`` that
    ``outputs`` holds; the other nodes 0), ``h_A`` the gradient where its output joins."""
    score = outputs.new_zeros(outputs.shape[1], len(spec.nodes))
    senders = spec.senders[rows or slice(None)]
    by_hook: dict[str, list[int]] = {}
    for row, node in enumerate(senders):
        by_hook.setdefault(sender_score_hook(adapter, spec, node), []).append(row)
    for hook, members in by_hook.items():
        values = einops.einsum(outputs[members], sender_grads[hook], "a b p d, b p d -> b a")
        score[:, [senders[r] for r in members]] = values.to(score.dtype)
    return score


def node_quantities(
    spec: GraphSpec,
    score: Float[Tensor, "batch node"],
    inputs: Float[Tensor, "batch node"],
    ledger: ConstantLedger | None,
    constants: Sequence[Tensor],
    target_value: Tensor,
    target_constant: Tensor,
) -> NodeQuantities:
    """The senders' scores (:func:`sender_scores`) and receivers' input scores
    (:func:`edges_and_inputs`) with the target's value and the own constants (``ledger=None``:
    none)."""
    own = torch.zeros_like(score)
    score = score.clone()
    score[:, spec.target] = target_value
    if ledger is not None:
        own = own_constants(spec, ledger, constants, own)
        own[:, spec.target] += target_constant
    return NodeQuantities(score, inputs, own)


def own_constants(
    spec: GraphSpec, ledger: ConstantLedger, constants: Sequence[Tensor], own: Tensor
) -> Tensor:
    """Each receiver's own constants ``<c_B, h_B>`` from the ledger's sites."""
    lookup: dict[tuple[str, int, int | None], int] = {}
    rest: dict[int, int] = {}
    for i, node in enumerate(spec.nodes):
        if node.kind == "head":
            lookup[("attn", node.layer, node.index)] = i
        elif node.kind == "mlp":
            lookup[("mlp", node.layer, None)] = i
            if node.index == -1:
                rest[node.layer] = i
        elif node.kind == "target":
            lookup[("final", node.layer, None)] = i
    for site, value in zip(ledger.sites, constants):
        if site.owner == "attn":
            if value.ndim == 1:  # a computed site the backward pass never reached: zero
                continue
            for head in range(value.shape[1]):
                node_index = lookup.get(("attn", site.layer, head))
                if node_index is not None:
                    own[:, node_index] += value[:, head]
        elif site.owner == "mlp":
            groups = [
                (i, n.neurons)
                for i, n in enumerate(spec.nodes)
                if n.kind == "neurons" and n.layer == site.layer
            ]
            if groups and value.ndim == 2:  # per neuron: to its group, the rest to rest
                taken = torch.zeros(value.shape[1], dtype=torch.bool, device=value.device)
                for i, neurons in groups:
                    assert neurons is not None
                    own[:, i] += value[:, list(neurons)].sum(-1)
                    taken[list(neurons)] = True
                own[:, rest[site.layer]] += value[:, ~taken].sum(-1)
            else:
                index = lookup.get(("mlp", site.layer, None))
                if index is not None:
                    own[:, index] += per_prompt(value)
        elif site.owner == "final":
            own[:, spec.target] += per_prompt(value)
    return own


def graph_pass(
    adapter: ModelAdapter,
    spec: GraphSpec,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    targets: Sequence[Target],
    *,
    rule: TaylorRule | None,
    split: AttentionSplit | None,
    linearise: bool = True,
    embed_override: Tensor | None = None,
    reference: Mapping[str, Tensor] | None = None,
    projected: bool = True,
    release: Collection[str] = (),
) -> AdjointPass:
    """One (linearised) forward on split inputs keeping everything a graph needs: the MLPs'
    own inputs, and per-head copies of the stream unless heads are ``projected``
    (:func:`~depass_lens.circuits.receivers.projects_heads`). ``release``: ``reference``
    activations to drop once the secant has read them."""
    store = set(receiver_hooks(adapter, spec, spec.target_hook, projected))
    store |= set(post_norm_stats(adapter))
    if projected:
        store |= set(head_input_stats(adapter, spec))
    store |= set(sender_hooks(adapter, spec))
    store |= {sender_score_hook(adapter, spec, i) for i in spec.senders}
    store |= {receiver_input_hook(adapter, spec, i) for i in spec.receivers}
    for t in targets:
        store.add(t.read_hook(adapter))
        store |= set(t.needed_hooks(adapter))
    return linearised_forward(
        adapter,
        tokens,
        attention_mask,
        rule or TaylorRule(),
        store,
        split=split,
        split_inputs=True,
        per_head=not projected,
        linearise=linearise,
        embed_override=embed_override,
        reference=reference,
        release=release,
    )


def post_norm_stats(adapter: ModelAdapter) -> list[str]:
    """Normalised values and scales of the post-sublayer norms (their secants need both)."""
    names = []
    for layer in range(adapter.n_layers):
        for which in ("attn", "mlp"):
            if which == "mlp" and adapter.attn_only:
                continue
            for norm in post_sublayer_norms(adapter, layer, which):  # type: ignore[arg-type]
                if norm.scale_hook is not None:
                    base = norm.scale_hook.removesuffix(".hook_scale")
                    names += [norm.scale_hook, f"{base}.hook_normalized"]
    return names


def target_jobs(adapter: ModelAdapter, targets: Sequence[Target]) -> list[tuple[Target, int]]:
    return [(t, k) for t in targets for k in range(t.size(adapter))]


def backward_jobs(
    adapter: ModelAdapter,
    spec: GraphSpec,
    passed: AdjointPass,
    tokens: Tensor,
    attention_mask: Tensor | None,
    targets: Sequence[Target],
    progress: bool = False,
    projected: bool = True,
):
    """For each scalar target: ``(value, constant, grads, constants)`` from one backward pass."""
    tctx = TargetContext(adapter, tokens, attention_mask, activations=passed.activations)
    functionals = {id(t): t.functional(tctx) for t in targets}
    hooks = sorted(
        set(receiver_hooks(adapter, spec, spec.target_hook, projected))
        | {sender_score_hook(adapter, spec, i) for i in spec.senders}
    )
    jobs = target_jobs(adapter, targets)
    iterator = tqdm(jobs, desc="DePass graph", leave=False, delay=2.0) if progress else jobs
    for i, (t, k) in enumerate(iterator):
        weights, constants = functionals[id(t)]
        state = passed.live[t.read_hook(adapter)]
        constant = constants[:, k].to(state.dtype)
        with torch.enable_grad():
            value = target_scalar(state, weights[:, k].to(state.dtype), constant)
            grads, sites = passed.backward(
                value.sum(), hooks, retain_graph=i < len(jobs) - 1, zeros_for_unused=False
            )
        yield value.detach(), constant, grads, sites


def plain_activations(
    adapter: ModelAdapter,
    spec: GraphSpec,
    tokens: Tensor,
    attention_mask: Tensor | None,
    targets: Sequence[Target],
    extra: Sequence[str] = (),
    split_inputs: bool = False,
    per_head: bool = True,
) -> dict[str, Tensor]:
    """A plain forward (e.g. on the corrupted input), caching what senders and targets read
    (and ``extra``), on split per-node inputs if asked (``per_head``: per-head copies too)."""
    names = graph_read_hooks(adapter, spec, targets) | set(extra)
    context = adapter.split_inputs(per_head) if split_inputs else nullcontext()
    with context:
        return frozen_activations(adapter, tokens, attention_mask, names)


def graph_read_hooks(adapter: ModelAdapter, spec: GraphSpec, targets: Sequence[Target]) -> set[str]:
    """What a graph reads of a run besides its linearised pass: the senders' outputs, the
    receivers' inputs and the targets' states."""
    names = set(sender_hooks(adapter, spec)) | set(post_norm_stats(adapter))
    names |= {receiver_input_hook(adapter, spec, i) for i in spec.receivers}
    for t in targets:
        names.add(t.read_hook(adapter))
        names |= set(t.needed_hooks(adapter))
    return names


def secant_only(
    adapter: ModelAdapter,
    spec: GraphSpec,
    targets: Sequence[Target],
    corrupt: Mapping[str, Tensor],
) -> set[str]:
    """The corrupted run's activations that only the secant's forward pass reads (queries,
    keys, values, MLP internals): released layer by layer as it goes. Scores and patterns stay
    (the integrated softmax and autograd keep them anyway), and so do norm statistics (graph
    gradients are pulled through the norms' secants)."""
    kept = graph_read_hooks(adapter, spec, targets) | set(norm_statistics(adapter))
    return {
        name
        for name in corrupt
        if name not in kept and not name.endswith(("hook_attn_scores", "hook_pattern"))
    }


def difference_sender_outputs(
    adapter: ModelAdapter,
    spec: GraphSpec,
    clean: Mapping[str, Tensor],
    corrupt: Mapping[str, Tensor],
    rows: slice | None = None,
) -> Float[Tensor, "sender batch pos d_model"]:
    """Each sender's change clean - corrupt (of ``spec.senders[rows]``, whole layers), exact
    under the difference linearisation.

    Where a post-sublayer norm follows (Gemma, OLMo), a head's (or neuron group's) change is
    its change before the norm sent through the norm's secant, so the changes of a layer's heads
    add up to its attention output's change and output biases change nothing.
    """
    senders = spec.senders[rows or slice(None)]
    outputs = sender_outputs(adapter, spec, clean, minus=corrupt, rows=rows)
    for row, node_index in enumerate(senders):
        node = spec.nodes[node_index]
        which = "attn" if node.kind in ("head", "bias") else "mlp"
        if node.kind not in ("head", "bias", "neurons") or not post_sublayer_norms(
            adapter,
            node.layer,
            which,  # type: ignore[arg-type]
        ):
            continue
        if node.kind == "bias":
            outputs[row] = 0.0
            continue
        if node.kind == "head":
            W_O = adapter.attention(node.layer).W_O[node.index]
            hook = f"blocks.{node.layer}.attn.hook_z"
            before = (clean[hook][:, :, node.index] - corrupt[hook][:, :, node.index]) @ W_O
        else:
            mlp, neurons = adapter.mlp(node.layer), list(node.neurons or ())
            hook = f"blocks.{node.layer}.mlp.hook_post"
            before = (clean[hook][..., neurons] - corrupt[hook][..., neurons]) @ mlp.W_out[neurons]
        outputs[row] = difference_outputs(adapter, clean, corrupt, node.layer, which, before)
    groups = [i for i in senders if spec.nodes[i].kind == "neurons"]
    for layer in {spec.nodes[i].layer for i in groups}:  # the rest: what the groups leave
        members = [
            r
            for r, i in enumerate(senders)
            if spec.nodes[i].layer == layer and spec.nodes[i].kind in ("neurons", "mlp")
        ]
        hook = f"blocks.{layer}.hook_mlp_out"
        outputs[members[-1]] = (clean[hook] - corrupt[hook]) - outputs[members[:-1]].sum(0)
    return outputs


__all__ = [
    "Edge",
    "check_contrast_alignment",
    "check_conservation",
    "check_graph_supported",
    "NodeQuantities",
    "Slot",
    "backward_jobs",
    "contract",
    "edges_and_inputs",
    "plain_activations",
    "depass_graph",
    "graph_pass",
    "node_quantities",
    "own_constants",
    "slot_blocks",
    "sender_outputs",
    "slots",
]


def depass_graph(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    targets: Sequence[Target],
    target_names: list[str],
    options: GraphNodes,
    *,
    rule: TaylorRule,
    split: AttentionSplit,
    contrast: Int[Tensor, "batch pos"] | None = None,
    linearisation: Literal["difference", "clean"] = "difference",
    by_position: bool = False,
    progress: bool = False,
    str_tokens: list[list[str]] | None = None,
    contrast_attention_mask: Tensor | None = None,
    check: bool = False,
    memory_budget: int | None = None,
) -> Graph:
    """The DePass graph: absolute, or relative to a corrupted input (``contrast``), with the
    difference (secant) linearisation or the clean run's frozen one.

    ``contrast_attention_mask`` is the contrast's own mask (default: ``attention_mask``); it must
    mark the same real positions (:func:`check_contrast_alignment`). ``check``: raise
    :class:`~depass_lens.errors.LosslessnessError` if the finished graph breaks its
    conservation laws (:func:`check_conservation`). ``memory_budget``: bytes the senders'
    outputs and one block of receivers' gradients may take at once (:func:`sender_chunks`;
    ``None``: a quarter of the device's free memory once both forward passes are done, so that
    what they keep is not counted twice)."""
    check_graph_supported(adapter, contrast is not None, linearisation)
    hooks = {t.read_hook(adapter) for t in targets}
    if len(hooks) != 1:
        raise DePassInputError(f"a graph's targets must read one hook; these read {sorted(hooks)}")
    spec = build_spec(adapter, options, tokens.shape[1], hooks.pop())
    difference = contrast is not None and linearisation == "difference"
    projected = projects_heads(adapter, split, linearise=True)
    corrupt = None
    if contrast is not None:
        if contrast.shape != tokens.shape:
            raise DePassInputError(
                f"contrast prompts have shape {tuple(contrast.shape)} but the prompts have "
                f"shape {tuple(tokens.shape)}: a contrast must match position by position"
            )
        if contrast_attention_mask is None:
            contrast_attention_mask = attention_mask
        check_contrast_alignment(tokens, attention_mask, contrast_attention_mask)
        extra = reference_hooks(adapter) if difference else ()
        corrupt = plain_activations(
            adapter,
            spec,
            contrast,
            contrast_attention_mask,
            targets,
            extra,
            split_inputs=difference,
            per_head=not projected,
        )
        if difference:
            drop_rebuildable_patterns(adapter, corrupt)
    passed = graph_pass(
        adapter,
        spec,
        tokens,
        attention_mask,
        targets,
        rule=rule,
        split=split,
        reference=corrupt if difference else None,
        projected=projected,
        release=secant_only(adapter, spec, targets, corrupt)
        if difference and corrupt is not None
        else (),
    )
    with torch.no_grad():
        acts = passed.activations
        reads = {receiver_input_hook(adapter, spec, i) for i in spec.receivers}
        stream = {h: acts[h] for h in reads}
        if corrupt is not None:
            stream = {h: v - corrupt[h].to(v.dtype) for h, v in stream.items()}

        def outputs_of(rows: slice) -> Tensor:
            if corrupt is None:
                return sender_outputs(adapter, spec, acts, rows=rows)
            if difference:
                return difference_sender_outputs(adapter, spec, acts, corrupt, rows)
            return sender_outputs(adapter, spec, acts, minus=corrupt, rows=rows)

        if memory_budget is None:
            memory_budget = free_memory(tokens.device) // 4
        chunks = sender_chunks(adapter, spec, tokens.shape, memory_budget)
        kept = outputs_of(chunks[0]) if len(chunks) == 1 else None  # one chunk: form it once
        the_slots = slots(spec)
        edge_rows, by_pos_rows, nodes, values = [], [], [], []
        tctx = TargetContext(adapter, tokens, attention_mask)
        functionals = {id(t): t.functional(tctx) for t in targets}
        jobs = target_jobs(adapter, targets)
        results = backward_jobs(
            adapter, spec, passed, tokens, attention_mask, targets, progress, projected
        )
        reference = corrupt if difference else None
        for (t, k), (value, constant, grads, sites) in zip(jobs, results):
            blocks = slot_blocks(
                adapter, spec, the_slots, grads, acts, reference, projected=projected
            )
            scores = inputs = score = None
            for rows in chunks:
                outputs = kept if kept is not None else outputs_of(rows)
                read = stream if rows.start == 0 else None  # receivers' inputs: once
                part, part_inputs = edges_and_inputs(
                    adapter, spec, the_slots, blocks, outputs, read, by_position, rows
                )
                part_score = sender_scores(adapter, spec, outputs, grads, rows)
                scores = part if scores is None else scores + part
                inputs = part_inputs if inputs is None else inputs
                score = part_score if score is None else score + part_score
                del outputs
            assert scores is not None and inputs is not None and score is not None
            if by_position:
                by_pos_rows.append(scores)
                scores = scores.sum(-1)
            edge_rows.append(scores)
            node_value = value
            if corrupt is not None:
                weights, constants = functionals[id(t)]
                state = corrupt[t.read_hook(adapter)].to(value.dtype)
                node_value = value - target_scalar(state, weights[:, k].to(value.dtype), constant)
            quantities = node_quantities(
                spec,
                score,
                inputs,
                passed.ledger if corrupt is None or difference else None,
                sites,
                node_value,
                constant if corrupt is None else torch.zeros_like(constant),
            )
            nodes.append(quantities)
            values.append(value)
        graph = Graph(
            spec=spec,
            edge_scores=torch.stack(edge_rows, 1),
            node_scores=torch.stack([q.score for q in nodes], 1),
            node_inputs=torch.stack([q.inputs for q in nodes], 1),
            own_bias=torch.stack([q.own for q in nodes], 1),
            target_names=target_names,
            target_values=torch.stack(values, 1),
            method="depass",
            attention=None if difference else split.side,
            contrast=contrast is not None,
            linearisation=None if contrast is None else linearisation,
            edge_scores_by_pos=torch.stack(by_pos_rows, 1) if by_position else None,
            str_tokens=str_tokens,
            meta={"rule": repr(rule)},
        )
    if check:
        check_conservation(graph, adapter.precision(graph.edge_scores.dtype))
    return graph


def sender_chunks(
    adapter: ModelAdapter, spec: GraphSpec, shape: tuple[int, ...], budget: int
) -> list[slice]:
    """Runs of whole layers of ``spec.senders`` whose outputs fit ``budget`` bytes beside one
    block of receivers' gradients (a layer's heads, ``[batch, pos, head, d_model]``). A layer's
    senders are never split: at least one layer's outputs are formed at a time, whatever the
    budget."""
    layers = sender_layers(spec)
    itemsize = compute_dtype(adapter.dtype).itemsize
    row = math.prod(shape) * adapter.d_model * itemsize  # one sender's output
    room = budget // row - adapter.n_heads
    chunks: list[slice] = []
    for layer in layers:
        last = chunks[-1] if chunks else None
        if last is not None and layer.stop - last.start <= room:
            chunks[-1] = slice(last.start, layer.stop)
        else:
            chunks.append(layer)
    return chunks


def check_graph_supported(
    adapter: ModelAdapter, contrast: bool, linearisation: str = "difference"
) -> None:
    """Refuse up front, with the reason, what a graph cannot be built on: the split per-node
    inputs every graph runs on (the adapter names what blocks them: e.g. ``use_split_qkv_input``
    left on, grouped-query attention on a TransformerBridge), then, for a contrast under the
    difference linearisation, what the secant cannot follow."""
    with adapter.split_inputs():  # entering checks the model; nothing runs
        pass
    if contrast and linearisation == "difference":
        check_difference_supported(adapter)


def check_conservation(graph: Graph, precision: torch.dtype, slack: float = 100.0) -> None:
    """Raise :class:`~depass_lens.errors.LosslessnessError` unless every conservation law the
    graph reports holds to ``slack`` times the tolerance of ``precision`` (the dtype whose
    rounding bounds the model's run): a graph that breaks its own laws holds wrong numbers."""
    limit = slack * tolerance(precision)
    errors = graph.conservation()
    broken = {law: error for law, error in errors.items() if not error <= limit}
    if broken:
        laws = ", ".join(f"{law} {error:.3g}" for law, error in broken.items())
        raise LosslessnessError(
            f"the circuit graph breaks its conservation laws ({laws}; the limit is {limit:.1g}): "
            "its edges do not add up to its nodes, so its scores cannot be trusted. Please "
            "report this with the model and the graph's options; DePass(..., check=False) "
            "returns the graph regardless"
        )
