"""How an MLP neuron's real output is split among the components that feed it.

For one neuron at one position, component ``c`` contributes ``g_c`` to the (gate) pre-activation,
with ``g = sum_c g_c`` the real pre-activation (the ``bias`` component carries ``b_in``). The
neuron's real value ``v`` is ``act(g)`` (plain MLP) or ``act(g) * u`` (gated MLP, ``u`` the real
up-projection, split as ``u_c``). A rule gives each component its part of ``v``; every rule here is
lossless: the parts sum to ``v`` exactly.

Rules are written to work on *chunks* of components: a non-linear rule first reduces statistics
over all chunks (a softmax normaliser, a running max, ...), then splits each chunk. Forward mode
therefore never needs every component's pre-activation in memory at once.

``g_c == 0`` means the component is absent at that position (e.g. a token later in the sequence):
the non-linear rules give absent components nothing.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from depass_lens.decomposition import ComponentLabel
from depass_lens.errors import DePassInputError

Shares = Float[Tensor, "batch comp pos d_mlp"]
PerNeuron = Float[Tensor, "batch pos d_mlp"]


@dataclass
class NeuronValues:
    """The real (frozen) values of one MLP layer's neurons.

    Attributes:
        gate: real (gate) pre-activation ``g``.
        act: ``act(g)``.
        value: the real neuron value ``v`` the rule splits (``act`` or ``act * up``).
        up: the real up-projection ``u`` of a gated MLP, else ``None``.
        act_fn: the model's activation function (for ``act'(0)`` near ``g == 0``).
    """

    gate: PerNeuron
    act: PerNeuron
    value: PerNeuron
    up: PerNeuron | None
    act_fn: Callable[[Tensor], Tensor]


class MLPRule(ABC):
    """Base class of split rules. ``linear`` rules make the decomposed pass a linear map."""

    name: str = "rule"
    linear: bool = False
    #: How many passes over all components :meth:`reduce` needs before :meth:`split`.
    reduce_passes: int = 1

    def reduce(self, state: Any, shares: Shares, offset: int, n_comp: int, stage: int = 0) -> Any:
        """Fold one chunk of components (``offset`` = index of its first) into the statistics.

        ``stage`` counts the passes over all components (``reduce_passes`` of them).
        """
        return state

    @abstractmethod
    def split(
        self,
        state: Any,
        shares: Shares,
        up_shares: Shares | None,
        values: NeuronValues,
        offset: int,
        n_comp: int,
    ) -> Shares:
        """Each component's part of the neuron value, for one chunk of components."""

    def bind(self, labels: Sequence[ComponentLabel]) -> MLPRule:
        """The rule for one decomposition with these component labels (most rules ignore them).

        The engine calls it once per start point, so a rule may depend on the component order
        (:class:`ReferenceParity` does) while propagation stays the same for every level.
        """
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _bias_mask(n_chunk: int, offset: int, n_comp: int, like: Tensor) -> Tensor:
    """``[1, chunk, 1, 1]`` indicator of the (global) bias component within a chunk."""
    index = torch.arange(offset, offset + n_chunk, device=like.device)
    return (index == n_comp - 1).to(like.dtype).view(1, -1, 1, 1)


def _weights_times_value(weights: Shares, values: NeuronValues) -> Shares:
    return weights * values.value.unsqueeze(1)


class TaylorRule(MLPRule):
    """Linear rule: the frozen ratio ``act(g)/g`` times each component's own share.

    Plain MLP: ``c`` receives ``act(g)/g * g_c``. Gated MLP, by ``side``: ``"gate"`` gives
    ``act(g)/g * g_c * u``; ``"up"`` gives ``act(g) * u_c``; ``"symmetric"`` averages the two.
    Where ``|g| < eps`` the ratio is ``act'(0)`` and the (tiny) remainder ``v - ratio*g`` goes to
    ``bias``, so the split stays exact. Linear in the components: this is what adjoint mode needs.
    """

    name = "taylor"
    linear = True

    def __init__(self, side: Literal["gate", "up", "symmetric"] = "gate", eps: float | None = None):
        if side not in ("gate", "up", "symmetric"):
            raise DePassInputError(f"taylor side must be gate, up or symmetric, got {side!r}")
        self.side = side
        self.eps = eps

    def __repr__(self) -> str:
        return f"TaylorRule(side={self.side!r})"

    def ratio(self, values: NeuronValues) -> PerNeuron:
        """``act(g)/g``, with ``act'(0)`` where ``|g|`` is below ``eps``."""
        g = values.gate
        eps = self.eps if self.eps is not None else (1e-12 if g.dtype == torch.float64 else 1e-6)
        small = g.abs() < eps
        safe = torch.where(small, torch.ones_like(g), g)
        return torch.where(small, act_slope_at_zero(values.act_fn, g), values.act / safe)

    def linearised_value(self, values: NeuronValues) -> PerNeuron:
        """What the linear map gives for the real shares (== v up to the near-zero remainder)."""
        r = self.ratio(values)
        if values.up is None:
            return r * values.gate
        gate_side = r * values.gate * values.up
        up_side = values.act * values.up
        return {"gate": gate_side, "up": up_side, "symmetric": 0.5 * (gate_side + up_side)}[
            self.side
        ]

    def split(self, state, shares, up_shares, values, offset, n_comp):
        r = self.ratio(values).unsqueeze(1)
        if values.up is None:
            out = r * shares
        else:
            if up_shares is None:
                raise DePassInputError("a gated MLP needs the up-projection shares")
            gate_side = r * shares * values.up.unsqueeze(1)
            up_side = values.act.unsqueeze(1) * up_shares
            out = {"gate": gate_side, "up": up_side, "symmetric": 0.5 * (gate_side + up_side)}[
                self.side
            ]
        remainder = (values.value - self.linearised_value(values)).unsqueeze(1)
        return out + _bias_mask(shares.shape[1], offset, n_comp, shares) * remainder


class SoftmaxRule(MLPRule):
    """``w_c = softmax_c(g_c / T)`` over present components, times ``v`` (DePass reference).

    Sign-blind: a large positive share wins the neuron whatever the sign of ``v``; weights are never
    negative. ``temperature`` defaults to the reference's 0.1.
    """

    name = "softmax"

    def __init__(self, temperature: float = 0.1):
        if not temperature > 0:
            raise DePassInputError(f"softmax temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def __repr__(self) -> str:
        return f"SoftmaxRule(temperature={self.temperature})"

    def reduce(self, state, shares, offset, n_comp, stage=0):
        logits = torch.where(shares != 0, shares / self.temperature, -torch.inf)
        chunk_max = logits.amax(dim=1)
        if state is None:
            running_max = chunk_max
            total = torch.zeros_like(chunk_max)
        else:
            old_max, total = state
            running_max = torch.maximum(old_max, chunk_max)
            total = total * _safe_exp(old_max - running_max)
        total = total + _safe_exp(logits - running_max.unsqueeze(1)).sum(dim=1)
        return running_max, total

    def split(self, state, shares, up_shares, values, offset, n_comp):
        running_max, total = state
        logits = torch.where(shares != 0, shares / self.temperature, -torch.inf)
        has_any = total > 0
        weights = _safe_exp(logits - running_max.unsqueeze(1)) / torch.where(
            has_any, total, torch.ones_like(total)
        ).unsqueeze(1)
        weights = weights + _bias_mask(shares.shape[1], offset, n_comp, shares) * (
            ~has_any
        ).unsqueeze(1).to(shares.dtype)
        return _weights_times_value(weights, values)


def _safe_exp(x: Tensor) -> Tensor:
    """``exp`` with ``-inf - -inf`` (nothing present yet) read as 0 instead of NaN."""
    return torch.exp(torch.nan_to_num(x, nan=-torch.inf))


class MaxRule(MLPRule):
    """All of ``v`` to the component with the largest share ``g_c`` (first one on ties)."""

    name = "max"

    def reduce(self, state, shares, offset, n_comp, stage=0):
        masked = torch.where(shares != 0, shares, -torch.inf)
        chunk_best, chunk_arg = masked.max(dim=1)
        chunk_arg = chunk_arg + offset
        if state is None:
            best = torch.full_like(chunk_best, -torch.inf)
            arg = torch.full_like(chunk_arg, n_comp - 1)  # nothing present: bias
        else:
            best, arg = state
        better = chunk_best > best
        return torch.where(better, chunk_best, best), torch.where(better, chunk_arg, arg)

    def split(self, state, shares, up_shares, values, offset, n_comp):
        _, arg = state
        index = torch.arange(offset, offset + shares.shape[1], device=shares.device)
        weights = (index.view(1, -1, 1, 1) == arg.unsqueeze(1)).to(shares.dtype)
        return _weights_times_value(weights, values)


class ReluRule(MLPRule):
    """``w_c = relu(g_c) / sum relu(g)``, times ``v``.

    Lossless fallback (the reference loses the neuron here): where no share is positive, all shares
    have the same sign as ``g`` and ``w_c = g_c / g`` (non-negative, sums to 1); where ``g == 0``
    too, ``v`` goes to ``bias``.
    """

    name = "relu"

    def reduce(self, state, shares, offset, n_comp, stage=0):
        positive, total = (0.0, 0.0) if state is None else state
        return positive + shares.clamp_min(0).sum(dim=1), total + shares.sum(dim=1)

    def split(self, state, shares, up_shares, values, offset, n_comp):
        positive, total = state
        has_positive = (positive > 0).unsqueeze(1)
        has_total = (total != 0).unsqueeze(1)
        w_relu = shares.clamp_min(0) / torch.where(
            positive > 0, positive, torch.ones_like(positive)
        ).unsqueeze(1)
        w_share = shares / torch.where(total != 0, total, torch.ones_like(total)).unsqueeze(1)
        bias = _bias_mask(shares.shape[1], offset, n_comp, shares).expand_as(shares)
        weights = torch.where(has_positive, w_relu, torch.where(has_total, w_share, bias))
        return _weights_times_value(weights, values)


class LinearRule(MLPRule):
    """``w_c = (g_c - min g) / sum (g - min g)`` over present components, times ``v``.

    The reference fills absent shares with the dtype's minimum *before* subtracting the minimum,
    which overflows and drops most of the MLP output; this implements the intended formula.
    Where all present shares are equal, they share ``v`` equally.
    """

    name = "linear"
    reduce_passes = 2  # the minimum first, then the sum of the very shares ``split`` divides

    @staticmethod
    def _centred(shares: Shares, low: PerNeuron) -> Shares:
        present = shares != 0
        return torch.where(present, shares - low.unsqueeze(1), torch.zeros_like(shares))

    def reduce(self, state, shares, offset, n_comp, stage=0):
        if stage == 1:  # exact denominator: the sum of the centred shares themselves
            low, count, denom = state
            return low, count, denom + self._centred(shares, low).sum(dim=1)
        present = shares != 0
        chunk_min = torch.where(present, shares, torch.inf).amin(dim=1)
        if state is None:
            low, count = chunk_min, present.sum(dim=1)
        else:
            low, count = torch.minimum(state[0], chunk_min), state[1] + present.sum(dim=1)
        low = torch.where(count > 0, low, torch.zeros_like(low))
        return low, count, torch.zeros_like(low)

    def split(self, state, shares, up_shares, values, offset, n_comp):
        low, count, denom = state
        present = shares != 0
        count_f = count.to(shares.dtype)
        centred = self._centred(shares, low)
        spread = (denom.abs() > 0).unsqueeze(1)
        uniform = present.to(shares.dtype) / count_f.clamp_min(1).unsqueeze(1)
        weights = torch.where(
            spread,
            centred / torch.where(denom != 0, denom, torch.ones_like(denom)).unsqueeze(1),
            uniform,
        )
        none_present = (count == 0).unsqueeze(1).to(shares.dtype)
        weights = weights + _bias_mask(shares.shape[1], offset, n_comp, shares) * none_present
        return _weights_times_value(weights, values)


def reference_roles(labels: Sequence[ComponentLabel]) -> tuple[int, int]:
    """Where the reference's first and last components are among ours, from their labels.

    The reference orders a head-, module- or neuron-level start ``[rest, unit_1, ..., unit_n]``
    (ours: ``[unit_1, ..., unit_n, rest, bias]``), so there its first component is our ``rest`` and
    its last is our last unit. A token-level start is ``[token_0, ..., token_n, left]``: the first
    is the BOS token and the last is the remainder, our ``bias``.
    """
    kinds = [label.kind for label in labels]
    if "rest" not in kinds:
        return 0, len(kinds) - 1
    units = [i for i, kind in enumerate(kinds) if kind not in ("rest", "bias")]
    return kinds.index("rest"), units[-1] if units else len(kinds) - 1


class ReferenceParity(MLPRule):
    """The DePass reference implementation's conventions around a non-linear rule, for parity.

    The paper's numbers were produced with these; they are off by default and only apply when
    this wrapper is used explicitly. The reference freezes attention patterns, so a
    :class:`~depass_lens.DePass` call with this rule uses ``attention="value"`` where no split
    was asked for, and refuses ``"symmetric"`` or ``"pattern"`` asked for explicitly (the mix
    gives neither the reference's numbers nor ours). The reference's special cases act on its
    *first* and *last* components, which the engine finds from the source's labels
    (:func:`reference_roles`): at token level the BOS token and ``bias`` (the reference's
    remainder "left"); at head, module and neuron level ``rest`` (the reference puts it first)
    and the last head, module or neuron. For one neuron at one position the reference's shares
    are edited, then the inner rule applies:

    1. ``ignore_bos`` (the reference's ``ignore_special_token=True``): the first component's share
       is zeroed, so the BOS token receives no MLP output after position 0;
    2. at position 0 the first component's share is *set to 1.0* (a pre-activation value, not a
       weight), then the rule applies as everywhere else: at token level only the BOS token is
       present there, so it gets the whole neuron; at head level ``rest`` competes with the heads;
    3. the last component's shares below ``remainder_floor`` (1e-5) in magnitude count as absent;
    4. where no share is left, the last component's becomes 1.0 (it gets the whole neuron).

    ``ignore_bos=None`` applies 1. where the reference does: at token level only (it passes
    ``ignore_special_token=False`` at the other levels). ``first``/``last`` (component indices,
    negative from the end) override the roles, e.g. for a ``Custom`` start. Ties of ``max`` break
    by our component order. It stays lossless: the weights at every neuron still sum to one. At
    neuron level the reference's rest is ``resid_mid - sum(neurons)`` (summing to the state before
    the MLP); ours is the stream before the MLP, summing to ``resid_post`` (a bug not reproduced).
    """

    def __init__(
        self,
        rule: MLPRule | str,
        ignore_bos: bool | None = None,
        remainder_floor: float = 1e-5,
        first: int | None = None,
        last: int | None = None,
    ):
        inner = get_rule(rule)
        if inner.linear:
            raise DePassInputError("ReferenceParity wraps the non-linear rules (softmax, max, ...)")
        self.inner = inner
        self.ignore_bos = ignore_bos
        self.remainder_floor = remainder_floor
        self.first = first
        self.last = last
        self.name = f"{inner.name}-reference"
        self.reduce_passes = inner.reduce_passes + 1  # first: is any share left at all?
        self._bos = True if ignore_bos is None else ignore_bos  # unbound: token level

    def __repr__(self) -> str:
        return f"ReferenceParity({self.inner!r}, ignore_bos={self.ignore_bos})"

    def bind(self, labels: Sequence[ComponentLabel]) -> ReferenceParity:
        first, last = reference_roles(labels)
        bound = copy.copy(self)
        bound.first = first if self.first is None else self.first % len(labels)
        bound.last = last if self.last is None else self.last % len(labels)
        at_bos = labels[bound.first].kind == "token" and labels[bound.first].pos == 0
        bound._bos = at_bos if self.ignore_bos is None else self.ignore_bos
        return bound

    def _roles(self, shares: Shares, offset: int, n_comp: int) -> tuple[Tensor, Tensor]:
        """``[1, chunk, 1, 1]`` indicators of the first and the last component in a chunk."""
        index = torch.arange(offset, offset + shares.shape[1], device=shares.device)
        index = einops.rearrange(index, "comp -> 1 comp 1 1")
        first = 0 if self.first is None else self.first % n_comp
        last = n_comp - 1 if self.last is None else self.last % n_comp
        return index == first, index == last

    def _edited(self, shares: Shares, offset: int, n_comp: int) -> Shares:
        """Edits 1-3 of the class docstring."""
        is_first, is_last = self._roles(shares, offset, n_comp)
        positions = torch.arange(shares.shape[2], device=shares.device)
        at_zero = einops.rearrange(positions == 0, "pos -> 1 1 pos 1")
        if self._bos:
            shares = torch.where(is_first & ~at_zero, torch.zeros_like(shares), shares)
        shares = torch.where(is_first & at_zero, torch.ones_like(shares), shares)
        floor = is_last & (shares.abs() < self.remainder_floor)
        return torch.where(floor, torch.zeros_like(shares), shares)

    def _final(self, shares: Shares, any_left: Tensor, offset: int, n_comp: int) -> Shares:
        """Edit 4: where no share is left, the last component's becomes 1.0."""
        edited = self._edited(shares, offset, n_comp)
        _, is_last = self._roles(shares, offset, n_comp)
        return torch.where(is_last & ~any_left.unsqueeze(1), torch.ones_like(edited), edited)

    def reduce(self, state, shares, offset, n_comp, stage=0):
        if stage == 0:
            left = (self._edited(shares, offset, n_comp) != 0).any(dim=1)
            return left if state is None else state | left
        any_left, inner = state if isinstance(state, tuple) else (state, None)
        final = self._final(shares, any_left, offset, n_comp)
        return any_left, self.inner.reduce(inner, final, offset, n_comp, stage - 1)

    def split(self, state, shares, up_shares, values, offset, n_comp):
        any_left, inner = state
        final = self._final(shares, any_left, offset, n_comp)
        return self.inner.split(inner, final, up_shares, values, offset, n_comp)


_RULES: dict[str, Callable[[], MLPRule]] = {
    "taylor": TaylorRule,
    "softmax": SoftmaxRule,
    "max": MaxRule,
    "relu": ReluRule,
    "linear": LinearRule,
}

#: The rule used when none is given; chosen by the faithfulness benchmark (docs/faithfulness.md).
DEFAULT_RULE = "taylor"


def get_rule(rule: str | MLPRule | None) -> MLPRule:
    """Resolve a rule name (``taylor``, ``softmax``, ``max``, ``relu``, ``linear``) or instance."""
    if rule is None:
        rule = DEFAULT_RULE
    if isinstance(rule, MLPRule):
        return rule
    if rule not in _RULES:
        raise DePassInputError(f"unknown MLP rule {rule!r}; choose one of {sorted(_RULES)}")
    return _RULES[rule]()


_SLOPES: dict[Any, Tensor] = {}


def act_slope_at_zero(act_fn: Callable[[Tensor], Tensor], like: Tensor) -> Tensor:
    """``act'(0)`` by autograd (e.g. 0.5 for GELU and SiLU, 0 for ReLU), cached per function."""
    key = (act_fn, like.dtype, like.device)
    if key not in _SLOPES:
        zero = torch.zeros(1, dtype=like.dtype, device=like.device, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(act_fn(zero).sum(), zero)
        _SLOPES[key] = grad.detach()[0]
    return _SLOPES[key]
