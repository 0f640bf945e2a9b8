"""What DePass returns: attribution scores with labels, and the decomposed activation cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache

from depass_lens.checks import check_choice, check_count, check_index
from depass_lens.decomposition import ComponentLabel, relative_error
from depass_lens.errors import DePassInputError
from depass_lens.readout import read_target


@dataclass
class Attribution:
    """Scores of every component for every scalar target.

    ``scores[b, t, c]`` is component ``c``'s share of target ``t`` on prompt ``b``. For every start
    point the shares sum, with its ``rest`` and ``bias`` entries, to the real target value
    (``target_values``): DePass is lossless.

    Attributes:
        scores: ``batch target comp``.
        labels: one :class:`ComponentLabel` per component (a multi-layer source repeats ``rest``
            and ``bias`` once per layer).
        target_names: one name per scalar target.
        target_values: the real value of each target, ``batch target``.
        mode: ``"forward"`` or ``"adjoint"``; ``rule``: the MLP rule's name; ``attention``: the
            attention split's side.
    """

    scores: Float[Tensor, "batch target comp"]
    labels: list[ComponentLabel]
    target_names: list[str]
    target_values: Float[Tensor, "batch target"]
    mode: str
    rule: str
    starts: list[slice] = field(default_factory=list)
    attention: str = "value"

    def __repr__(self) -> str:
        b, t, c = self.scores.shape
        return (
            f"Attribution(batch={b}, targets={t}, components={c}, mode={self.mode!r}, "
            f"rule={self.rule!r}, attention={self.attention!r})"
        )

    def _select(self, kind: str) -> list[int]:
        index = [i for i, label in enumerate(self.labels) if label.kind == kind]
        if not index:
            raise DePassInputError(f"this attribution has no {kind!r} components")
        return index

    def of_kind(self, kind: str) -> Float[Tensor, "batch target n"]:
        """Scores of the components of one kind (``head``, ``neuron``, ``token``, ...)."""
        return self.scores[..., self._select(kind)]

    def restrict(self, kind: str) -> Attribution:
        """The start points that contain components of ``kind``, with their rest and bias.

        E.g. ``restrict("head")`` on a combined tokens+heads+neurons attribution.
        """
        chosen = [
            s
            for s in self.starts or [slice(0, len(self.labels))]
            if any(self.labels[j].kind == kind for j in range(s.start, s.stop))
        ]
        if not chosen:
            raise DePassInputError(f"this attribution has no {kind!r} components")
        keep = [j for s in chosen for j in range(s.start, s.stop)]
        starts, position = [], 0
        for s in chosen:
            starts.append(slice(position, position + s.stop - s.start))
            position += s.stop - s.start
        return Attribution(
            self.scores[..., keep],
            [self.labels[j] for j in keep],
            self.target_names,
            self.target_values,
            self.mode,
            self.rule,
            starts,
            attention=self.attention,
        )

    def heads(self) -> Float[Tensor, "batch target layer head"]:
        """Head scores as a ``layer x head`` grid (missing heads are NaN)."""
        index = self._select("head")
        layers = sorted({self.labels[i].layer for i in index})  # type: ignore[type-var]
        n_heads = max(int(self.labels[i].index or 0) for i in index) + 1
        grid = self.scores.new_full((*self.scores.shape[:2], len(layers), n_heads), torch.nan)
        for i in index:
            label = self.labels[i]
            grid[..., layers.index(label.layer), label.index] = self.scores[..., i]
        return grid

    def tokens(self) -> Float[Tensor, "batch target pos"]:
        return self.of_kind("token")

    def neurons(self, layer: int | None = None) -> Float[Tensor, "batch target neuron"]:
        index = self._select("neuron")
        if layer is not None:
            have = sorted({self.labels[i].layer for i in index})  # type: ignore[type-var]
            if layer not in have:
                raise DePassInputError(
                    f"layer {layer!r} has no neurons in this attribution; its neuron layers: {have}"
                )
            index = [i for i in index if self.labels[i].layer == layer]
        return self.scores[..., index]

    def _batch_index(self, batch: int) -> int:
        """``batch`` as an index into the prompts (negative counts from the end), else an error."""
        n = self.scores.shape[0]
        return check_index(batch, n, "batch", of=f"for {n} prompt(s)")

    def _target_index(self, target: int) -> int:
        """``target`` as an index into the scalar targets, else an error naming them."""
        names = self.target_names
        return check_index(target, len(names), "target", of=f"for the targets {names}")

    @property
    def bias(self) -> Float[Tensor, "batch target"]:
        """Total score of the bias component(s): what the model's constant terms contribute."""
        return self.scores[..., self._select("bias")].sum(-1)

    def completeness_error(self) -> float:
        """Max relative gap between each start point's summed scores and the real target value."""
        worst = 0.0
        for part in self.starts or [slice(None)]:
            gap = (self.scores[..., part].sum(-1) - self.target_values).abs().max()
            scale = self.target_values.abs().max().clamp_min(1e-12)
            worst = max(worst, float(gap / scale))
        return worst

    def top(
        self, k: int = 10, target: int = 0, batch: int = 0, by: str = "abs"
    ) -> list[tuple[str, float]]:
        """The ``k`` components with the largest score, excluding rest/bias.

        ``by="abs"`` ranks by magnitude, ``by="signed"`` by value (most positive first).
        """
        k = check_count(k, "k")
        check_choice(by, ("abs", "signed"), "by")
        row = self.scores[self._batch_index(batch), self._target_index(target)]
        keep = [i for i, lab in enumerate(self.labels) if lab.kind not in ("rest", "bias")]
        values = row[keep]
        order = (values.abs() if by == "abs" else values).argsort(descending=True)[:k]
        return [(str(self.labels[keep[i]]), float(values[i])) for i in order]

    def to_records(self) -> list[dict[str, Any]]:
        """Tidy rows: one per (prompt, target, component), ready for a DataFrame."""
        rows = []
        scores = self.scores.detach().cpu()
        for b in range(scores.shape[0]):
            for t, name in enumerate(self.target_names):
                for c, label in enumerate(self.labels):
                    rows.append(
                        {
                            "batch": b,
                            "target": name,
                            "kind": label.kind,
                            "layer": label.layer,
                            "index": label.index,
                            "pos": label.pos,
                            "label": str(label),
                            "score": float(scores[b, t, c]),
                        }
                    )
        return rows

    def to_dataframe(self):
        """The tidy form as a pandas DataFrame (pandas is optional)."""
        import pandas as pd  # noqa: PLC0415

        return pd.DataFrame(self.to_records())


def read_target_scalar(state: Tensor, target: Any, ctx: Any) -> Float[Tensor, "batch comp"]:
    """The first scalar of ``target`` per component."""
    return read_target(state, target, ctx)[:, 0]


class DecomposedCache(ActivationCache):
    """An ``ActivationCache`` of the decomposed run: each entry has a ``comp`` axis after ``batch``.

    Indexing works as for TransformerLens caches (``cache["resid_post", 3]`` or full hook names).
    ``labels`` names the components; the last one is ``bias``.
    """

    def __init__(
        self, cache_dict: dict[str, Tensor], model: Any, labels: list[ComponentLabel], readout: Any
    ):
        super().__init__(cache_dict, model, has_batch_dim=True)
        self.labels = labels
        self._readout = readout

    def __repr__(self) -> str:
        return f"DecomposedCache({len(self.labels)} components, {len(self.cache_dict)} hooks)"

    def logits(self) -> Float[Tensor, "batch comp pos d_vocab"]:
        """Each component's logits (the bias component holds ``b_U``); they sum to the logits.

        For models with ``output_logits_soft_cap`` these are the logits *before* the cap.
        """
        return self._readout.logits(self["unembed.hook_in"])

    def logit_attribution(self, token: Any, pos: int = -1) -> Float[Tensor, "batch comp"]:
        """Each component's share of ``token``'s logit at ``pos`` (a per-prompt position)."""
        return self._readout.logit_attribution(self["unembed.hook_in"], token, pos)

    @torch.no_grad()
    def logit_lens(  # type: ignore[override]  # TL 4's ActivationCache has a kwargs-only one
        self, target: Any, hooks: Sequence[str] | None = None
    ) -> Float[Tensor, "hook batch comp"]:
        """Each component's share of a logit-type ``target``, read after every residual hook.

        The final norm is applied with the scale of the real residual at each hook (the logit
        lens), so the shares add up to TransformerLens's ``accumulated_resid(..., apply_ln=True)``
        read-out, and the last entry is each component's actual share. ``hooks`` defaults to every
        cached ``hook_resid_post``.
        """
        if hooks is None:
            hooks = sorted(
                (n for n in self.cache_dict if n.endswith("hook_resid_post")),
                key=lambda n: int(n.split(".")[1]),
            )
        ctx = self._readout.target_context()
        rows = []
        for hook in hooks:
            lensed = self._readout.lens(self[hook])
            rows.append(read_target_scalar(lensed, target, ctx))
        return torch.stack(rows)

    def check_lossless(self, real: ActivationCache | dict[str, Tensor]) -> dict[str, float]:
        """Relative error ``max|sum(comp) - real| / max|real|`` at every hook present in both."""
        real_dict = getattr(real, "cache_dict", real)
        return {
            name: relative_error(value, real_dict[name])
            for name, value in self.cache_dict.items()
            if name in real_dict and real_dict[name].shape == value.sum(1).shape
        }
