"""The comp-axis tensor: an additive split of a hidden state, with an explicit ``bias`` component.

A decomposition of a hidden state ``h`` (``batch pos d_model``) is ``C`` (``batch comp pos
d_model``) with ``C.sum(comp) == h``. By convention the *last* component is ``bias``: every
constant term met during propagation (biases, norm offsets) is added to it, so the sum stays exact
and nothing is silently dropped or smeared over the other components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.errors import DePassInputError, LosslessnessError


@dataclass(frozen=True)
class ComponentLabel:
    """What one component is: its kind and where it comes from.

    ``kind`` is one of ``token``, ``pos_embed``, ``head``, ``neuron``, ``attn``, ``mlp``,
    ``subspace``, ``custom``, ``rest`` or ``bias``. ``layer``/``index``/``pos`` locate it.
    """

    kind: str
    layer: int | None = None
    index: int | None = None
    pos: int | None = None
    text: str | None = None

    def __str__(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.index}"
        if self.kind == "neuron":
            return f"L{self.layer}N{self.index}"
        if self.kind in ("attn", "mlp"):
            return f"L{self.layer}.{self.kind}"
        if self.kind == "token":
            return f"{self.pos}:{self.text}" if self.text is not None else f"tok{self.pos}"
        if self.kind in ("subspace", "custom"):
            return self.text or f"{self.kind}{self.index}"
        where = f"L{self.layer}." if self.layer is not None else ""
        return f"{where}{self.kind}"


BIAS = ComponentLabel("bias")


def tolerance(dtype: torch.dtype) -> float:
    """Relative losslessness tolerance for a dtype (fp64 1e-10, fp32 1e-5, half types 1e-2)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


def relative_error(
    components: Float[Tensor, "batch comp pos d"], real: Float[Tensor, "batch pos d"]
) -> float:
    """``max|sum(components) - real| / max|real|``: the losslessness measure used everywhere.

    Entries where the real activation is infinite (masked attention scores) are not compared.
    """
    total, real = components.detach().sum(dim=1), real.detach()
    finite = torch.isfinite(real)
    if not bool(finite.all()):
        total, real = total[finite], real[finite]
    denom = real.abs().max().clamp_min(torch.finfo(real.dtype).tiny)
    return float((total.to(real.dtype) - real).abs().max() / denom)


def add_to_bias(
    x: Float[Tensor, "batch comp *rest"], constant: Tensor
) -> Float[Tensor, "batch comp *rest"]:
    """Return ``x`` with ``constant`` added to the last (``bias``) component, out of place."""
    return torch.cat([x[:, :-1], x[:, -1:] + constant], dim=1)


@dataclass
class Decomposition:
    """An additive split of the residual stream at one TransformerLens hook point.

    Attributes:
        hook: where the split lives, e.g. ``"blocks.3.hook_resid_mid"`` or ``"hook_embed"``.
        components: ``batch comp pos d_model``; the last component is ``bias``.
        labels: one :class:`ComponentLabel` per component (the last is ``BIAS``).
        pos_components: with ``hook == "hook_embed"``, the split of the positional embedding
            (``None`` for models without additive positions).
    """

    hook: str
    components: Float[Tensor, "batch comp pos d_model"]
    labels: list[ComponentLabel]
    pos_components: Float[Tensor, "batch comp pos d_model"] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.components.ndim != 4:
            raise DePassInputError(
                "components must have shape [batch comp pos d_model], got "
                f"{tuple(self.components.shape)}"
            )
        if len(self.labels) != self.components.shape[1]:
            raise DePassInputError(
                f"{len(self.labels)} labels for {self.components.shape[1]} components"
            )
        if self.labels[-1].kind != "bias":
            raise DePassInputError("the last component of a decomposition must be the bias")

    @property
    def n_components(self) -> int:
        return self.components.shape[1]

    def total(self) -> Float[Tensor, "batch pos d_model"]:
        state = self.components.sum(dim=1)
        if self.pos_components is not None:
            state = state + self.pos_components.sum(dim=1)
        return state

    def check_sums_to(self, real: Float[Tensor, "batch pos d_model"], what: str) -> float:
        """Raise unless the components sum to ``real`` within the dtype's tolerance."""
        check_lossless(self.components, real, what, pos_components=self.pos_components)
        return relative_error(self.components, real)


def check_lossless(
    components: Float[Tensor, "batch comp pos d"],
    real: Float[Tensor, "batch pos d"],
    what: str,
    *,
    pos_components: Float[Tensor, "batch comp pos d"] | None = None,
    slack: float = 1.0,
    error: type[Exception] = LosslessnessError,
    precision: torch.dtype | None = None,
) -> float:
    """Check ``sum(components) == real`` to ``slack * tolerance(precision)``; return the error.

    ``precision`` (default: the components' dtype) is the dtype whose rounding bounds the real
    activations, e.g. float32 for a float64 model whose norms compute in float32."""
    if pos_components is not None:
        components = torch.cat([components, pos_components], dim=1)
    if not torch.isfinite(components).all():
        raise error(f"components at {what} contain NaN or inf")
    err = relative_error(components, real)
    limit = slack * tolerance(precision or components.dtype)
    if not err <= limit:
        raise error(
            f"components at {what} do not sum to the real activation: relative error {err:.3g} "
            f"> {limit:.1g}"
        )
    return err
