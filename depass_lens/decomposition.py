"""The comp-axis tensor: an additive split of a hidden state, with an explicit ``bias`` component.

A decomposition of a hidden state ``h`` (``batch pos d_model``) is ``C`` (``batch comp pos
d_model``) with ``C.sum(comp) == h``. By convention the *last* component is ``bias``: every
constant term met during propagation (biases, norm offsets) is added to it, so the sum stays exact
and nothing is silently dropped or smeared over the other components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
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


#: Half-precision dtypes: DePass computes on them in float32 (:func:`compute_dtype`).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DePass propagates and accumulates in for a model in ``dtype``: float32 for
    float16 and bfloat16 (a sum over many components, a norm scale or a quadrature in half
    precision would lose the digits the split is about), else ``dtype`` itself."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def tolerance(dtype: torch.dtype) -> float:
    """Relative losslessness tolerance for a dtype (fp64 1e-10, fp32 1e-5, half types below).

    A half-precision model's real activations are what is reproduced, and each of its
    sublayers rounds its output and the residual sum to ``u = eps / 2`` of their size
    (``eps``: bf16 ``2^-7``, fp16 ``2^-10``). Components propagated in float32 through the
    frozen model differ from the real stream by those roundings, carried through the later
    layers: measured at most ``2.3 eps`` (losslessness) and ``3.6 eps`` (head scores against
    float32) on 3- and 12-layer GPT-2- and LLaMA-shaped models (``benchmarks/half_precision.py``,
    ``docs/limitations.md``). The tolerance is :data:`HALF_GROWTH` ``eps``: bf16 ``6.3e-2``,
    fp16 ``7.8e-3``.
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return HALF_GROWTH * torch.finfo(dtype).eps


#: How many half-precision ``eps`` the real activations may be from a float32 replay of the
#: frozen model; see :func:`tolerance`.
HALF_GROWTH = 8.0
#: The most ``slack`` a check against half-precision activations applies to their tolerance.
HALF_SLACK = 2.0


def unmasked(x: Tensor) -> Tensor:
    """Where ``x`` is a real value rather than a mask: finite, and above half the dtype's most
    negative number (Hugging Face masks attention scores by adding that number, TransformerLens
    by ``-inf``; no real score comes near it)."""
    return torch.isfinite(x) & (x > torch.finfo(x.dtype).min / 2)


def score_mask(scores: Float[Tensor, "batch head query key"]) -> Bool[Tensor, "batch _ query key"]:
    """:func:`unmasked` attention scores, as one head's ``query x key`` mask (broadcast over the
    heads) where every head sees the same keys, as causal and padding masks make them: a
    quarter of the scores' bytes per head saved wherever the mask is kept for a whole pass."""
    allowed = unmasked(scores)
    first = allowed[:, :1]
    if allowed.shape[1] > 1 and torch.equal(allowed, first.expand_as(allowed)):
        return first.clone()  # a copy: the full mask's storage is freed
    return allowed


def relative_error(
    components: Float[Tensor, "batch comp pos d"], real: Float[Tensor, "batch pos d"]
) -> float:
    """``max|sum(components) - real| / max|real|``: the losslessness measure used everywhere.

    Masked attention scores are not compared: entries where the real activation is infinite or
    at the dtype's most negative number (:func:`unmasked`).
    """
    total, real = components.detach().sum(dim=1), real.detach()
    finite = unmasked(real)
    if not bool(finite.all()):
        total, real = total[finite], real[finite]
    wide = torch.promote_types(total.dtype, real.dtype)  # compare without rounding either side
    total, real = total.to(wide), real.to(wide)
    denom = real.abs().max().clamp_min(torch.finfo(wide).tiny)
    return float((total - real).abs().max() / denom)


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
    activations, e.g. float32 for a float64 model whose norms compute in float32. Real
    activations in half precision (float32 components of a bfloat16 model) are reproduced to
    their own :func:`tolerance` at best, so that bounds the limit from below; it already counts
    the model's roundings, so ``slack`` multiplies it by at most :data:`HALF_SLACK`."""
    if pos_components is not None:
        components = torch.cat([components, pos_components], dim=1)
    if not torch.isfinite(components).all():
        raise error(f"components at {what} contain NaN or inf")
    err = relative_error(components, real)
    limit = slack * tolerance(precision or components.dtype)
    if real.dtype in HALF_DTYPES:
        limit = max(limit, min(slack, HALF_SLACK) * tolerance(real.dtype))
    if not err <= limit:
        raise error(
            f"components at {what} do not sum to the real activation: relative error {err:.3g} "
            f"> {limit:.1g}"
        )
    return err
