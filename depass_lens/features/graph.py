"""A computed feature graph: nodes, each receiver's incoming edges, and the checks they obey.

Rows are receivers (targets, then latents in the order they were computed), columns are all
nodes: ``edges[r, a]`` is the edge from node ``a`` into receiver ``receivers[r]``, the
contribution of ``a``'s output to that receiver's pre-activation (or target value) in the local
replacement model. ``kind_edges`` splits every edge by the paths it takes (``value``, ``query``,
``key``) and sums to ``edges``.

Exactness, checked by :meth:`FeatureGraph.check`: each receiver's incoming edges plus its own
constant (``b_enc``, or the target's ``b_U``) equal its real pre-activation (target value). The
edges and constants come from gradients and the real values from the model's own forward pass,
so a path the replacement model misses shows up as a gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.decomposition import tolerance
from depass_lens.errors import DePassInputError, LosslessnessError
from depass_lens.features.nodes import FeatureNode, latent_name


@dataclass
class FeatureGraph:
    """The attribution graph of one prompt over dictionary latents (see :mod:`.build`).

    Attributes:
        nodes: every node (:class:`~depass_lens.features.nodes.FeatureNode`).
        receivers: node index of each computed row.
        edges: ``[rows, nodes]`` incoming edges of each computed receiver.
        kind_edges: ``{kind: [rows, nodes]}``, summing to ``edges``.
        activation: each node's activation (latents; NaN for others).
        value: each receiver's real pre-activation or target value (NaN for others).
        own: each receiver's own constant (NaN for others).
        tokens: the prompt's tokens as strings.
        attention: the attention split (``"value"``, ``"pattern"``, ``"symmetric"``).
        settings: how it was computed (conventions, dtype, batch size, ...).
        magnitude: each receiver's size that its real value's rounding is relative to
            (``|value|``, or the two runs' ``|values|`` summed for a change; NaN for others).
    """

    nodes: list[FeatureNode]
    receivers: Int[Tensor, " rows"]
    edges: Float[Tensor, "rows nodes"]
    kind_edges: dict[str, Float[Tensor, "rows nodes"]]
    activation: Float[Tensor, " nodes"]
    value: Float[Tensor, " nodes"]
    own: Float[Tensor, " nodes"]
    tokens: list[str]
    attention: str
    settings: dict[str, Any] = field(default_factory=dict)
    magnitude: Float[Tensor, " nodes"] | None = None

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.kind] = counts.get(node.kind, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in counts.items())
        return (
            f"FeatureGraph({what}; {len(self.receivers)} receivers computed, "
            f"attention={self.attention!r})"
        )

    def index(self, name: str) -> int:
        """The node index of ``name`` (``L1.mlp[37]@4``, ``token@3``, ...)."""
        found = self._names().get(name)
        if found is None:
            raise KeyError(f"no node named {name!r} in this graph")
        return found

    def _names(self) -> dict[str, int]:
        cached = self.__dict__.get("_name_index")
        if cached is None:
            cached = {node.name: i for i, node in enumerate(self.nodes)}
            self.__dict__["_name_index"] = cached
        return cached

    def latent(self, site: str, index: int, pos: int) -> int:
        """The node index of latent ``index`` of dictionary ``site`` at ``pos``.

        Raises :class:`~depass_lens.errors.DePassInputError` for an unknown site, a latent
        outside the dictionary or a position outside the prompt, and says so when the latent
        exists but is not active there (inactive latents are not nodes)."""
        widths: dict[str, int] = self.settings.get("d_sae", {})
        if site not in widths:
            raise DePassInputError(f"no dictionary {site!r} in this graph; it has {sorted(widths)}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < widths[site]:
            raise DePassInputError(
                f"latent {index!r} is not a latent of {site!r} (d_sae={widths[site]}: "
                f"0..{widths[site] - 1})"
            )
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < len(self.tokens):
            raise DePassInputError(
                f"position {pos!r} is outside the prompt (0..{len(self.tokens) - 1})"
            )
        found = self._names().get(latent_name(site, index, pos))
        if found is None:
            raise DePassInputError(
                f"latent {index} of {site!r} is not active at position {pos}, so it is not a node"
            )
        return found

    @property
    def targets(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind == "target"]

    def row(self, node: int | str) -> int:
        """The row holding ``node``'s incoming edges (it must have been computed)."""
        index = self.index(node) if isinstance(node, str) else node
        hits = (self.receivers == index).nonzero()
        if hits.numel() == 0:
            raise KeyError(f"node {self.nodes[index].name!r} has no computed incoming edges")
        return int(hits[0, 0])

    def incoming(self, node: int | str, kind: str | None = None) -> Float[Tensor, " nodes"]:
        """Edges into ``node`` from every node (one kind's part with ``kind``)."""
        source = self.edges if kind is None else self.kind_edges[kind]
        return source[self.row(node)]

    def adjacency(self) -> Float[Tensor, "nodes nodes"]:
        """Dense ``[receiver, sender]`` matrix over all nodes (circuit-tracer's layout)."""
        full = self.edges.new_zeros(len(self.nodes), len(self.nodes))
        full[self.receivers] = self.edges
        return full

    def subgraph(self, keep: Bool[Tensor, " nodes"]) -> FeatureGraph:
        """The graph on the nodes ``keep`` marks: their rows and the edges among them (a
        subgraph need not be exact: what dropped nodes carried is gone)."""
        keep = keep.to(torch.bool)
        new_index = torch.cumsum(keep.long(), 0) - 1
        rows = keep[self.receivers]
        return FeatureGraph(
            nodes=[n for n, k in zip(self.nodes, keep.tolist()) if k],
            receivers=new_index[self.receivers[rows]],
            edges=self.edges[rows][:, keep],
            kind_edges={k: v[rows][:, keep] for k, v in self.kind_edges.items()},
            activation=self.activation[keep],
            value=self.value[keep],
            own=self.own[keep],
            tokens=self.tokens,
            attention=self.attention,
            settings=dict(self.settings),
            magnitude=None if self.magnitude is None else self.magnitude[keep],
        )

    # ------------------------------------------------------------------ scores
    def target_scores(self, target: int = 0) -> Float[Tensor, " nodes"]:
        """Each node's direct edge into target ``target`` (its exact share: they sum, with the
        target's own constant, to the target's value)."""
        return self.incoming(self.targets[target])

    def error_share(self, target: int = 0) -> float:
        """The part of the target carried by error nodes, as a fraction of the target."""
        scores = self.target_scores(target)
        errors = torch.tensor([n.kind == "error" for n in self.nodes], device=scores.device)
        value = float(self.value[self.targets[target]])
        return float(scores[errors].sum()) / value if value else float("nan")

    # ------------------------------------------------------------------ checks
    def check(self) -> dict[str, float]:
        """Largest relative gap ``|incoming + own - real| / scale`` over computed latents and
        over targets; ``scale`` is the row's ``sum |edge| + |own| + |real|`` plus its
        :attr:`magnitude` (a change from a corrupted run is the difference of two values, each
        rounded to its own size), which bounds the rounding of both sides."""
        rows = self.edges.detach()
        real = self.value[self.receivers]
        own = self.own[self.receivers]
        gap = (rows.sum(-1) + own - real).abs()
        scale = rows.abs().sum(-1) + own.abs() + real.abs()
        if self.magnitude is not None:
            scale = scale + self.magnitude[self.receivers].nan_to_num()
        relative = gap / scale.clamp_min(torch.finfo(rows.dtype).tiny)
        is_target = torch.tensor(
            [self.nodes[int(i)].kind == "target" for i in self.receivers], device=rows.device
        )
        out = {}
        for name, where in (("latents", ~is_target), ("targets", is_target)):
            out[name] = float(relative[where].max()) if bool(where.any()) else 0.0
        if self.kind_edges:
            parts = sum(self.kind_edges.values())
            assert isinstance(parts, Tensor)
            out["kinds"] = float(
                ((parts - rows).abs().sum(-1) / scale.clamp_min(torch.finfo(rows.dtype).tiny)).max()
            )
        return out

    def raise_if_inexact(self, slack: float = 1.0) -> None:
        """Raise :class:`~depass_lens.errors.LosslessnessError` if :meth:`check` exceeds the
        dtype's tolerance (times ``slack``)."""
        limit = tolerance(self.edges.dtype) * slack
        gaps = self.check()
        bad = {k: v for k, v in gaps.items() if not v <= limit}
        if bad:
            raise LosslessnessError(
                f"feature graph is not exact: relative gaps {bad} exceed {limit:.1e}. A path of "
                "the model is missing from the replacement model (or the model changed between "
                "passes)"
            )

    # ------------------------------------------------------------------ tables
    def node_table(self, target: int = 0):
        """Nodes as a pandas DataFrame: name, kind, layer, pos, site, index, activation,
        pre-activation (receivers), score (direct edge into the target)."""
        import pandas as pd  # noqa: PLC0415 - a TransformerLens dependency, imported on use

        scores = self.target_scores(target).tolist()
        return pd.DataFrame(
            {
                "name": [n.name for n in self.nodes],
                "kind": [n.kind for n in self.nodes],
                "layer": [n.layer for n in self.nodes],
                "pos": [n.pos for n in self.nodes],
                "site": [n.site for n in self.nodes],
                "index": [n.index for n in self.nodes],
                "activation": self.activation.tolist(),
                "value": self.value.tolist(),
                "score": scores,
            }
        )

    def edge_table(self, min_abs: float = 0.0):
        """Non-zero edges (``|weight| > min_abs``) as a pandas DataFrame, largest first, with
        each kind's part as a column."""
        import pandas as pd  # noqa: PLC0415

        rows, cols = torch.nonzero(self.edges.abs() > min_abs, as_tuple=True)
        weight = self.edges[rows, cols]
        order = weight.abs().argsort(descending=True)
        rows, cols, weight = rows[order], cols[order], weight[order]
        names = [n.name for n in self.nodes]
        table: dict[str, Sequence[Any]] = {
            "source": [names[int(c)] for c in cols],
            "target": [names[int(self.receivers[int(r)])] for r in rows],
            "weight": weight.tolist(),
        }
        for kind, part in self.kind_edges.items():
            table[kind] = part[rows, cols].tolist()
        return pd.DataFrame(table)


__all__ = ["FeatureGraph"]
