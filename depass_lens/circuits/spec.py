"""Which nodes and edges a circuit graph has, where each node reads and writes the stream.

A graph's nodes are *senders* (what writes into the residual stream: the embeddings, every head,
every MLP or neuron group, and each layer's output bias ``b_O``, which belongs to no head) and
*receivers* (what reads it: each head's query, key and value input, each MLP's input, and the
target). Because the stream is a sum, the input a receiver reads is exactly the sum of the outputs
of the senders written before it, so an edge ``A -> B`` exists for every sender written before the
receiver reads. This module builds that structure from the adapter; it holds no scores.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.constants import output_constant
from depass_lens.errors import DePassInputError
from depass_lens.frozen import Activations
from depass_lens.norms import (
    frozen_scale,
    norm_map,
    post_norm_scale_hooks,
    post_sublayer_norms,
)
from depass_lens.targets import FINAL

NodeKind = Literal["embed", "token", "bias", "head", "mlp", "neurons", "target"]
EdgeKind = Literal["q", "k", "v", "mlp", "direct"]
#: Receiving sides of a head, in the order their edges are listed.
HEAD_SIDES: tuple[EdgeKind, ...] = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """One node: ``name`` (``L1H3``, ``L0.mlp``, ``L2.mlp[0]``, ``embed``, ``embed[4]``,
    ``L1.b_O``, ``logits``), its kind, layer and index (head, neuron group or position).

    ``write`` and ``read`` place it in the forward pass (the stream after the embedding is 0,
    each layer spans 3 units); a sender feeds a receiver iff ``sender.write < receiver.read``.
    ``neurons`` lists a neuron group's neurons.
    """

    name: str
    kind: NodeKind
    layer: int
    index: int | None = None
    write: float | None = None
    read: float | None = None
    neurons: tuple[int, ...] | None = None

    @property
    def sends(self) -> bool:
        return self.write is not None

    @property
    def receives(self) -> bool:
        return self.read is not None


@dataclass(frozen=True)
class Edge:
    """``sender -> receiver`` through the receiver's ``kind`` input (indices into the nodes)."""

    sender: int
    receiver: int
    kind: EdgeKind


@dataclass(frozen=True)
class GraphNodes:
    """Which nodes a graph has.

    Args:
        embed: ``"pooled"``, one ``embed`` node for the whole input, or ``"tokens"``, one node per
            position (``embed[p]``: the token and, with learned positions, its position).
        neurons: ``{layer: [[n, ...], ...]}``: split that layer's MLP into neuron groups (each a
            node) plus ``L.mlp.rest`` (the other neurons and ``b_out``); other MLPs stay whole.
    """

    embed: Literal["pooled", "tokens"] = "pooled"
    neurons: Mapping[int, Sequence[Sequence[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embed not in ("pooled", "tokens"):
            raise DePassInputError(f"embed must be 'pooled' or 'tokens', not {self.embed!r}")
        object.__setattr__(self, "neurons", neuron_groups(self.neurons))


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy or a 0-d integer tensor), else
    ``None``: floats, bools and strings name no neuron (``0.5`` must not become neuron 0)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python's, NumPy's bool
        return None
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def neuron_groups(neurons: Any) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Validate ``{layer: [[n, ...], ...]}`` and normalise it to tuples of Python ints.

    Refused: a layer or neuron that is not an integer, a bare list of neurons (``{0: [0, 1]}``
    for ``{0: [[0, 1]]}``), an empty group or layer, a negative index, a neuron listed twice or
    in two groups. Ranges against the model are checked when the graph is built."""
    if not isinstance(neurons, Mapping):
        raise DePassInputError(
            f"neurons must be a mapping {{layer: [[neuron, ...], ...]}}, got {neurons!r}"
        )
    out: dict[int, tuple[tuple[int, ...], ...]] = {}
    for key, groups in neurons.items():
        layer = _integer(key)
        if layer is None:
            raise DePassInputError(f"neuron groups: layer {key!r} is not a layer index (an int)")
        example = f"e.g. {{{layer}: [[0, 1, 2]]}}"
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
            raise DePassInputError(
                f"neuron groups: layer {layer}'s groups must be lists of neuron indices, "
                f"{example}; got {groups!r}"
            )
        groups = list(groups)
        if not groups:
            raise DePassInputError(
                f"neuron groups: layer {layer} has no groups; leave it out to keep its MLP whole"
            )
        checked: list[tuple[int, ...]] = []
        seen: set[int] = set()
        for group in groups:
            if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
                raise DePassInputError(
                    f"neuron groups: layer {layer}'s groups must be lists of neuron indices, "
                    f"{example}; got {groups!r}"
                )
            members: list[int] = []
            for value in group:
                index = _integer(value)
                if index is None:
                    raise DePassInputError(
                        f"neuron groups: layer {layer} lists {value!r}, not a neuron index (an int)"
                    )
                if index < 0:
                    raise DePassInputError(
                        f"neuron groups: layer {layer} lists neuron {index}: negative indices "
                        "are not neurons (count from 0)"
                    )
                if index in members:
                    raise DePassInputError(
                        f"neuron groups: a group of layer {layer} lists neuron {index} more "
                        "than once (it would be counted twice)"
                    )
                members.append(index)
            if not members:
                raise DePassInputError(f"neuron groups: layer {layer} has an empty group")
            if seen & set(members):
                raise DePassInputError(
                    f"neuron groups: layer {layer}'s groups overlap (neurons "
                    f"{sorted(seen & set(members))[:5]} are in two groups)"
                )
            seen |= set(members)
            checked.append(tuple(members))
        if layer in out:
            raise DePassInputError(f"neuron groups: layer {layer} is given twice")
        out[layer] = tuple(checked)
    return out


def as_graph_nodes(nodes: GraphNodes | str | None) -> GraphNodes:
    """``None``/``"pooled"``/``"tokens"`` or a :class:`GraphNodes`."""
    if nodes is None:
        return GraphNodes()
    if isinstance(nodes, str):
        return GraphNodes(embed=nodes)  # type: ignore[arg-type]
    if not isinstance(nodes, GraphNodes):
        raise DePassInputError(f"nodes must be a GraphNodes, 'pooled' or 'tokens', got {nodes!r}")
    return nodes


def _attn_write(layer: int) -> float:
    return 3 * layer + 1


def _mlp_read(adapter: ModelAdapter, layer: int) -> float:
    return 3 * layer if adapter.parallel else 3 * layer + 1.5


def _mlp_write(layer: int) -> float:
    return 3 * layer + 2


def read_position(adapter: ModelAdapter, hook: str) -> float:
    """Where a target reading ``hook`` reads the stream (residual hooks and the final norm)."""
    if hook == FINAL:
        return 3.0 * adapter.n_layers
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2].startswith("hook_resid_"):
        layer, stage = int(parts[1]), parts[2].removeprefix("hook_resid_")
        return {"pre": 3 * layer, "mid": 3 * layer + 1.5, "post": 3 * layer + 2.5}[stage]
    raise DePassInputError(
        f"a circuit graph's target must read the residual stream ('unembed.hook_in' or "
        f"'blocks.L.hook_resid_pre/mid/post'), not {hook!r}; for where a head looks, use "
        "attention='pattern' or 'symmetric' and read that head's query and key edges"
    )


def _check_groups(
    adapter: ModelAdapter, neurons: Mapping[int, Sequence[Sequence[int]]]
) -> dict[int, tuple[tuple[int, ...], ...]]:
    """The (already well-formed) neuron groups checked against the model."""
    checked = neuron_groups(neurons)
    if not checked:
        return {}
    if adapter.attn_only:
        raise DePassInputError("neuron groups: this model is attention-only; it has no MLPs")
    if adapter.is_moe:
        raise DePassInputError(
            "neuron groups: mixture-of-experts layers have per-expert neurons; use whole MLPs"
        )
    for layer, groups in checked.items():
        if not 0 <= layer < adapter.n_layers:
            raise DePassInputError(
                f"neuron groups: layer {layer!r} is out of range (0..{adapter.n_layers - 1})"
            )
        if adapter.mlp(layer).inner_norm is not None:
            raise DePassInputError(
                "neuron groups: SoLU-LN normalises across neurons, so a group's output depends "
                "on the others; use whole MLPs for this model"
            )
        bad = [n for group in groups for n in group if not n < adapter.d_mlp]
        if bad:
            raise DePassInputError(
                f"neuron groups: neuron(s) {bad[:5]} of layer {layer} out of range "
                f"(d_mlp={adapter.d_mlp})"
            )
    return checked


@dataclass
class GraphSpec:
    """The nodes and edges of one model's graph (for one target read point and node options)."""

    nodes: list[Node]
    edges: list[Edge]
    options: GraphNodes
    n_pos: int
    target_hook: str = FINAL

    @property
    def senders(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.sends]

    @property
    def receivers(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.receives]

    @property
    def target(self) -> int:
        return len(self.nodes) - 1

    def index(self, name: str) -> int:
        for i, node in enumerate(self.nodes):
            if node.name == name:
                return i
        raise DePassInputError(f"no node named {name!r} in this graph")

    def edge_index(self) -> dict[tuple[str, str, str], int]:
        """``(sender name, receiver name, kind) -> edge index``."""
        return {
            (self.nodes[e.sender].name, self.nodes[e.receiver].name, e.kind): i
            for i, e in enumerate(self.edges)
        }


def build_spec(
    adapter: ModelAdapter, options: GraphNodes, n_pos: int, target_hook: str = FINAL
) -> GraphSpec:
    """The graph of ``adapter``'s model: senders, receivers and every edge between them."""
    groups = _check_groups(adapter, options.neurons)
    target_read = read_position(adapter, target_hook)
    nodes: list[Node] = []
    if options.embed == "tokens":
        nodes += [Node(f"embed[{p}]", "token", -1, p, write=-1.0) for p in range(n_pos)]
    else:
        nodes.append(Node("embed", "embed", -1, write=-1.0))
    for layer in range(adapter.n_layers):
        read, write = 3.0 * layer, _attn_write(layer)
        for head in range(adapter.n_heads):
            nodes.append(Node(f"L{layer}H{head}", "head", layer, head, write=write, read=read))
        nodes.append(Node(f"L{layer}.b_O", "bias", layer, write=write))
        if adapter.attn_only:
            continue
        read, write = _mlp_read(adapter, layer), _mlp_write(layer)
        if layer in groups:
            for g, neurons in enumerate(groups[layer]):
                name = f"L{layer}.mlp[{g}]"
                nodes.append(Node(name, "neurons", layer, g, write, read, neurons))
            nodes.append(Node(f"L{layer}.mlp.rest", "mlp", layer, -1, write=write, read=read))
        else:
            nodes.append(Node(f"L{layer}.mlp", "mlp", layer, write=write, read=read))
    # nothing written after the target's read point can reach it, nothing read after it matters
    nodes = [
        n
        for n in nodes
        if (n.write is None or n.write < target_read) and (n.read is None or n.read < target_read)
    ]
    name = "logits" if target_hook == FINAL else "target"
    nodes.append(Node(name, "target", adapter.n_layers, read=target_read))
    edges = []
    for r, receiver in enumerate(nodes):
        if receiver.read is None:
            continue
        sides: tuple[EdgeKind, ...] = HEAD_SIDES if receiver.kind == "head" else ("mlp",)
        if receiver.kind == "target":
            sides = ("direct",)
        for side in sides:
            for s, sender in enumerate(nodes):
                if sender.write is not None and sender.write < receiver.read:
                    edges.append(Edge(s, r, side))
    return GraphSpec(nodes, edges, options, n_pos, target_hook)


def check_contrast_alignment(
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    contrast_attention_mask: Tensor | None,
) -> None:
    """A contrastive graph pairs each position of a prompt with the same position of its
    contrast (every per-position node, the secant of every attention pattern, the target's read
    position): both must have real tokens at the same positions. Refuse, naming the rows and
    their lengths, where they do not."""
    if attention_mask is None and contrast_attention_mask is None:
        return
    full = torch.ones_like(tokens, dtype=torch.bool)
    mine = full if attention_mask is None else attention_mask.to(tokens.device).bool()
    theirs = (
        full
        if contrast_attention_mask is None
        else contrast_attention_mask.to(tokens.device).bool()
    )
    if theirs.shape != mine.shape:
        raise DePassInputError(
            f"the contrast's attention mask has shape {tuple(theirs.shape)}, the prompts' "
            f"{tuple(mine.shape)}"
        )
    rows = (mine != theirs).any(-1).nonzero().flatten().tolist()
    if not rows:
        return
    lines = []
    for r in rows[:5]:
        n_mine, n_theirs = int(mine[r].sum()), int(theirs[r].sum())
        if n_mine != n_theirs:
            lines.append(f"row {r}: the prompt has {n_mine} real tokens, its contrast {n_theirs}")
        else:
            lines.append(f"row {r}: {n_mine} real tokens each, padded at different positions")
    more = f" (and {len(rows) - 5} more rows)" if len(rows) > 5 else ""
    raise DePassInputError(
        "a contrast is compared with its prompt position by position, so each corrupted prompt "
        "needs real tokens where its prompt has them (the same token length, padded alike); "
        + "; ".join(lines)
        + more
        + ". Pair prompts of equal token length, or build a graph per length"
    )


# ---------------------------------------------------------------------------- reading the stream
def target_read_hook(adapter: ModelAdapter, target_hook: str) -> str:
    """The residual hook whose gradient is the target's direct read (the final norm's input)."""
    if target_hook == FINAL:
        return f"blocks.{adapter.n_layers - 1}.hook_resid_post"
    return target_hook


def sender_hooks(adapter: ModelAdapter, spec: GraphSpec) -> list[str]:
    """Real activations the senders' outputs (and neuron groups' pull-backs) are built from."""
    names = {"hook_embed"}
    if adapter.positional == "standard":
        names.add("hook_pos_embed")
    for node in spec.nodes:
        if node.kind == "head" or node.kind == "bias":
            names.add(f"blocks.{node.layer}.attn.hook_z")
            names |= set(post_norm_scale_hooks(adapter, node.layer, "attn"))
        elif node.kind in ("mlp", "neurons"):
            names.add(f"blocks.{node.layer}.hook_mlp_out")
            names |= set(post_norm_scale_hooks(adapter, node.layer, "mlp"))
            if node.kind == "neurons":  # its input gradient is pulled back through ln2
                names.add(f"blocks.{node.layer}.mlp.hook_post")
                ln2 = adapter.block_norms(node.layer)["ln2"]
                if not adapter.post_norm and ln2 is not None and ln2.scale_hook is not None:
                    base = ln2.scale_hook.removesuffix(".hook_scale")  # both for its secant
                    names |= {ln2.scale_hook, f"{base}.hook_normalized"}
    return sorted(names)


def sender_outputs(
    adapter: ModelAdapter,
    spec: GraphSpec,
    acts: Activations,
    minus: Activations | None = None,
    rows: slice | None = None,
) -> Float[Tensor, "sender batch pos d_model"]:
    """What every sender (or the senders ``spec.senders[rows]``, whole layers) writes into the
    stream, in the order of ``spec.senders``; with ``minus`` (another run's activations), its
    change from that run. Written into one tensor, layer by layer: no second copy exists."""
    senders = spec.senders[rows or slice(None)]
    embed = _embedding(adapter, acts, minus)
    out = embed.new_empty(len(senders), *embed.shape)
    heads: dict[int, tuple[Tensor, bool]] = {}
    mlps: dict[int, list[Tensor]] = {}
    for row, i in enumerate(senders):
        node = spec.nodes[i]
        if node.kind == "embed":
            out[row] = embed
        elif node.kind == "token":
            out[row] = 0.0
            out[row, :, node.index] = embed[:, node.index]
        elif node.kind == "head":
            if node.layer not in heads:
                heads.clear()  # one layer's heads at a time
                heads[node.layer] = _head_inputs(adapter, node.layer, acts, minus)
            formed, is_z = heads[node.layer]
            if is_z:  # z (or its change) [batch, pos, head, d_head]: this head projected alone
                _project_head(formed[:, :, node.index], adapter, node, out[row])
            else:  # the heads' outputs [batch, head, pos, d_model]
                out[row] = formed[:, node.index]
        elif node.kind == "bias":
            out[row] = _difference(_bias_output, adapter, node.layer, acts, minus)
        elif node.kind in ("mlp", "neurons"):
            if node.layer not in mlps:
                mlps.clear()
                parts = _mlp_outputs(adapter, spec, node.layer, acts)
                if minus is not None:
                    others = _mlp_outputs(adapter, spec, node.layer, minus)
                    parts = [x - y.to(x.dtype) for x, y in zip(parts, others)]
                mlps[node.layer] = parts
            out[row] = mlps[node.layer].pop(0)
    return out


def sender_layers(spec: GraphSpec) -> list[slice]:
    """``spec.senders`` cut into runs of one layer each (the embeddings' run first)."""
    layers = [spec.nodes[i].layer for i in spec.senders]
    cuts = [0] + [r for r in range(1, len(layers)) if layers[r] != layers[r - 1]]
    return [slice(a, b) for a, b in zip(cuts, [*cuts[1:], len(layers)])]


def _embedding(adapter: ModelAdapter, acts: Activations, minus: Activations | None) -> Tensor:
    """The embedding's output (token plus learned position), or its change from ``minus``."""
    embed = acts["hook_embed"]
    if adapter.positional == "standard":
        embed = embed + acts["hook_pos_embed"]
    if minus is None:
        return embed
    return embed - _embedding(adapter, minus, None).to(embed.dtype)


def _difference(output, adapter: ModelAdapter, layer: int, acts: Activations, minus) -> Tensor:
    """``output(adapter, layer, acts)``, less its value on ``minus`` if given."""
    value = output(adapter, layer, acts)
    return value if minus is None else value - output(adapter, layer, minus).to(value.dtype)


def _bias_output(
    adapter: ModelAdapter, layer: int, acts: Activations
) -> Float[Tensor, "batch pos d_model"]:
    """A layer's ``b_O`` as it joins the stream (through any post-attention norm)."""
    z = acts[f"blocks.{layer}.attn.hook_z"]
    b_O = adapter.attention(layer).b_O.expand(z.shape[0], z.shape[1], -1)
    return output_constant(adapter, layer, "attn", acts, b_O)


def _head_inputs(
    adapter: ModelAdapter, layer: int, acts: Activations, minus: Activations | None
) -> tuple[Tensor, bool]:
    """What a layer's heads' outputs (or their changes from ``minus``) are formed from, and
    whether it is ``z``: where no norm follows the attention the map is linear in ``z``, so
    ``z`` (or its change, ``batch pos head d_head``) is returned for each head's row to be
    projected alone; otherwise the outputs themselves (:func:`_head_outputs`, ``batch head pos
    d_model``)."""
    if post_sublayer_norms(adapter, layer, "attn"):
        return _difference(_head_outputs, adapter, layer, acts, minus), False
    name = f"blocks.{layer}.attn.hook_z"
    z = acts[name]
    return (z if minus is None else z - minus[name].to(z.dtype)), True


def _project_head(
    z: Float[Tensor, "batch pos d_head"], adapter: ModelAdapter, node: Node, into: Tensor
) -> None:
    """``into = z W_O`` of ``node``'s head, written straight into ``into`` where autograd and
    dtypes allow (no copy of the row)."""
    W_O = adapter.attention(node.layer).W_O[node.index].to(z.dtype)
    if torch.is_grad_enabled() or z.dtype != into.dtype:
        into.copy_(z @ W_O)
    else:
        torch.matmul(z, W_O, out=into)


def _head_outputs(
    adapter: ModelAdapter, layer: int, acts: Activations
) -> Float[Tensor, "batch head pos d_model"]:
    """Each head's output through the frozen post-attention norms (their biases excluded)."""
    z = acts[f"blocks.{layer}.attn.hook_z"]
    per_head = einops.einsum(z, adapter.attention(layer).W_O, "b p h e, h e d -> b h p d")
    for norm in post_sublayer_norms(adapter, layer, "attn"):
        per_head = norm_map(per_head, norm, frozen_scale(acts, norm))
    return per_head


def _mlp_outputs(
    adapter: ModelAdapter, spec: GraphSpec, layer: int, acts: Activations
) -> list[Tensor]:
    """A layer's MLP output, or its neuron groups' outputs and the rest (in node order)."""
    out = acts[f"blocks.{layer}.hook_mlp_out"]
    groups = [n.neurons for n in spec.nodes if n.kind == "neurons" and n.layer == layer]
    if not groups:
        return [out]
    mlp = adapter.mlp(layer)
    post = acts[f"blocks.{layer}.mlp.hook_post"]
    parts = []
    for group in groups:
        assert group is not None
        neurons = list(group)
        part = (post[..., neurons] @ mlp.W_out[neurons]).unsqueeze(1)
        for norm in post_sublayer_norms(adapter, layer, "mlp"):
            part = norm_map(part, norm, frozen_scale(acts, norm))
        parts.append(part[:, 0])
    return [*parts, out - torch.stack(parts).sum(0)]
