"""What is being explained: linear read-outs of the stream at one hook.

Every target is affine in the hidden state at its read hook: ``value = <weights, state> + constant``
(``unembed.hook_in``, the final-norm output, for logits). That is what lets forward mode read each
component's share directly and adjoint mode take one gradient per scalar target. A target may hold
several scalars (``HiddenState`` without a direction has one per model dimension).

Positions are per prompt and count real tokens only: ``pos=-1`` is each row's last non-pad token,
``pos=0`` its first, whatever the padding side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.errors import DePassInputError
from depass_lens.frozen import Activations

FINAL = "unembed.hook_in"
TokenSpec = str | int | Sequence[str | int] | Tensor


@dataclass
class TargetContext:
    """The input a target is resolved against."""

    adapter: ModelAdapter
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None
    activations: Activations | None = None  # real activations, for targets that read them

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


def resolve_positions(
    pos: int | Sequence[int] | Tensor, ctx: TargetContext
) -> Int[Tensor, " batch"]:
    """Absolute positions in the (padded) token tensor for a per-prompt position."""
    batch, n_pos = ctx.tokens.shape
    mask = ctx.attention_mask
    if mask is None:
        mask = torch.ones_like(ctx.tokens)
    mask = mask.to(ctx.tokens.device).bool()
    lengths = mask.sum(-1)
    first = mask.float().argmax(-1)  # first real token (left padding shifts it)
    requested = torch.as_tensor(pos, device=ctx.tokens.device).long().flatten()
    if requested.numel() == 1:
        requested = requested.expand(batch)
    if requested.numel() != batch:
        raise DePassInputError(f"pos has {requested.numel()} entries for a batch of {batch}")
    out_of_range = (requested >= lengths) | (requested < -lengths)
    if out_of_range.any():
        row = int(out_of_range.nonzero()[0, 0])
        raise DePassInputError(
            f"position {int(requested[row])} is out of range for prompt {row}, which has "
            f"{int(lengths[row])} real tokens"
        )
    relative = torch.where(requested < 0, requested + lengths, requested)
    return first + relative


def resolve_token(adapter: ModelAdapter, token: str | int) -> int:
    """A vocabulary id from an id or a string that must be exactly one token."""
    vocab = adapter.W_U.shape[1]
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise DePassInputError(f"a target token must be a str or an int id, got {token!r}")
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise DePassInputError(f"token id {token} is outside the vocabulary (0..{vocab - 1})")
        return token
    model = adapter.model
    if model.tokenizer is None:
        raise DePassInputError(
            f"target {token!r} is a string but the model has no tokenizer; pass a token id"
        )
    ids = adapter.to_tokens(token, prepend_bos=False)[0].tolist()  # never cut at n_ctx
    if len(ids) != 1:
        pieces = model.to_str_tokens(torch.tensor(ids)) if ids else []
        raise DePassInputError(
            f"target {token!r} is {len(ids)} tokens {pieces}, not one; pick a single-token target "
            "(mind the leading space) or pass a token id"
        )
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and token != model.tokenizer.unk_token:
        raise DePassInputError(f"target {token!r} is not in the vocabulary (it maps to <unk>)")
    return int(ids[0])


def resolve_tokens(adapter: ModelAdapter, tokens: TokenSpec, batch: int) -> Int[Tensor, " batch"]:
    """One token id per prompt, from one token for all or a sequence with one per prompt."""
    if isinstance(tokens, Tensor):
        ids = tokens.flatten().tolist()
    elif isinstance(tokens, (str, int)):
        ids = [tokens]
    else:
        ids = list(tokens)
    resolved = [resolve_token(adapter, t) for t in ids]
    if len(resolved) == 1:
        resolved = resolved * batch
    if len(resolved) != batch:
        raise DePassInputError(f"{len(resolved)} target tokens for a batch of {batch} prompts")
    return torch.tensor(resolved, device=adapter.device)


def describe_tokens(tokens: TokenSpec, role: str = "token") -> str:
    """A short name for a token spec: the token itself, or ``role`` for one token per prompt."""
    if isinstance(tokens, str):
        return tokens.strip() or repr(tokens)
    if isinstance(tokens, int):
        return f"#{tokens}"
    items = tokens.flatten().tolist() if isinstance(tokens, Tensor) else list(tokens)
    if len(set(map(str, items))) == 1:
        return describe_tokens(items[0], role)
    return role


def _place(
    vectors: Float[Tensor, "batch k d_model"], positions: Int[Tensor, " batch"], n_pos: int
) -> Float[Tensor, "batch k pos d_model"]:
    """Put one ``d_model`` weight vector per scalar at each prompt's position, zeros elsewhere."""
    batch, k, d = vectors.shape
    out = vectors.new_zeros(batch, k, n_pos, d)
    out[torch.arange(batch), :, positions] = vectors
    return out


class Target(ABC):
    """An affine read-out of the stream at :meth:`read_hook`, possibly several scalars at once."""

    read_at: str = FINAL

    def read_hook(self, adapter: ModelAdapter) -> str:
        return self.read_at

    @abstractmethod
    def functional(
        self, ctx: TargetContext
    ) -> tuple[Float[Tensor, "batch k pos d_model"], Float[Tensor, "batch k"]]:
        """``(weights, constants)``: scalar k is ``<weights[:, k], state> + constants[:, k]``."""

    @abstractmethod
    def names(self, ctx: TargetContext) -> list[str]:
        """One label per scalar."""

    def size(self, adapter: ModelAdapter) -> int:
        return 1

    def needed_hooks(self, adapter: ModelAdapter) -> list[str]:
        """Real activations :meth:`functional` reads from ``ctx.activations`` (most need none)."""
        return []


class Logit(Target):
    """The logit of ``token`` (one for all prompts, or one per prompt) at ``pos``.

    ``name`` labels the target in results and figures (default: from the token).
    """

    def __init__(self, token: TokenSpec, pos: int | Sequence[int] = -1, name: str | None = None):
        self.token = token
        self.pos = pos
        self.name = name

    def __repr__(self) -> str:
        return f"Logit({self.token!r}, pos={self.pos})"

    def functional(self, ctx):
        ids = resolve_tokens(ctx.adapter, self.token, ctx.batch)
        positions = resolve_positions(self.pos, ctx)
        vectors = ctx.adapter.W_U[:, ids].T.unsqueeze(1)
        return _place(vectors, positions, ctx.tokens.shape[1]), ctx.adapter.b_U[ids].unsqueeze(1)

    def names(self, ctx):
        return [self.name or f"logit({describe_tokens(self.token, 'target')})"]


class LogitDiff(Target):
    """``logit(correct) - logit(wrong)`` at ``pos`` (each a token or one token per prompt).

    ``name`` labels the target in results and figures (e.g. ``"IO - S"``; default: from the tokens).
    """

    def __init__(
        self,
        correct: TokenSpec,
        wrong: TokenSpec,
        pos: int | Sequence[int] = -1,
        name: str | None = None,
    ):
        self.correct = correct
        self.wrong = wrong
        self.pos = pos
        self.name = name

    def __repr__(self) -> str:
        return f"LogitDiff({self.correct!r}, {self.wrong!r}, pos={self.pos})"

    def functional(self, ctx):
        good = resolve_tokens(ctx.adapter, self.correct, ctx.batch)
        bad = resolve_tokens(ctx.adapter, self.wrong, ctx.batch)
        positions = resolve_positions(self.pos, ctx)
        W_U, b_U = ctx.adapter.W_U, ctx.adapter.b_U
        vectors = (W_U[:, good] - W_U[:, bad]).T.unsqueeze(1)
        constants = (b_U[good] - b_U[bad]).unsqueeze(1)
        return _place(vectors, positions, ctx.tokens.shape[1]), constants

    def names(self, ctx):
        correct = describe_tokens(self.correct, "correct")
        wrong = describe_tokens(self.wrong, "wrong")
        return [self.name or f"logit({correct}) - logit({wrong})"]


class CenteredLogit(Target):
    """The logit of ``token`` minus the mean logit over the vocabulary, at ``pos``: read with the
    demeaned unembedding ``W_U[:, t] - mean_v W_U[:, v]`` (and ``b_U`` likewise centred). A
    softmax does not see the mean, so this is what moves the probability; circuit-tracer's logit
    nodes inject the same vector (without ``b_U``, a constant that adds no edge)."""

    def __init__(self, token: TokenSpec, pos: int | Sequence[int] = -1, name: str | None = None):
        self.token = token
        self.pos = pos
        self.name = name

    def __repr__(self) -> str:
        return f"CenteredLogit({self.token!r}, pos={self.pos})"

    def functional(self, ctx):
        ids = resolve_tokens(ctx.adapter, self.token, ctx.batch)
        positions = resolve_positions(self.pos, ctx)
        W_U, b_U = ctx.adapter.W_U, ctx.adapter.b_U
        vectors = (W_U[:, ids] - W_U.mean(-1, keepdim=True)).T.unsqueeze(1)
        constants = (b_U[ids] - b_U.mean()).unsqueeze(1)
        return _place(vectors, positions, ctx.tokens.shape[1]), constants

    def names(self, ctx):
        return [self.name or f"centred logit({describe_tokens(self.token, 'target')})"]


def _check_vector(vector: Tensor, d_model: int, what: str) -> Tensor:
    if vector.ndim not in (1, 2) or vector.shape[-1] != d_model:
        raise DePassInputError(
            f"{what}: direction must have d_model={d_model} entries, got {tuple(vector.shape)}"
        )
    if not torch.isfinite(vector).all():
        raise DePassInputError(f"{what}: direction contains NaN or inf")
    return vector


class Direction(Target):
    """``<direction, state[pos]>`` at a hook (default: the final-norm output, ``unembed.hook_in``).

    ``direction`` is ``[d_model]`` (shared) or ``[batch, d_model]`` (one per prompt); e.g. a probe.
    """

    def __init__(
        self,
        direction: Tensor,
        pos: int | Sequence[int] = -1,
        hook: str = FINAL,
        name: str = "direction",
    ):
        self.direction = direction
        self.pos = pos
        self.read_at = hook
        self.name = name

    def __repr__(self) -> str:
        return f"Direction(hook={self.read_at!r}, pos={self.pos})"

    def functional(self, ctx):
        vector = _check_vector(self.direction, ctx.adapter.d_model, "Direction")
        vector = vector.to(device=ctx.adapter.device, dtype=ctx.adapter.dtype)
        vectors = (
            vector.expand(ctx.batch, -1).unsqueeze(1) if vector.ndim == 1 else vector.unsqueeze(1)
        )
        if vectors.shape[0] != ctx.batch:
            raise DePassInputError(
                f"Direction: {vectors.shape[0]} directions for a batch of {ctx.batch}"
            )
        positions = resolve_positions(self.pos, ctx)
        return _place(vectors, positions, ctx.tokens.shape[1]), vectors.new_zeros(ctx.batch, 1)

    def names(self, ctx):
        return [self.name]


class HiddenState(Target):
    """The hidden state at ``hook``/``pos``: ``d_model`` scalars (or one, with ``direction``).

    Explaining every dimension makes many targets and few sources the common case: ``mode="auto"``
    then picks forward mode.
    """

    def __init__(self, hook: str, pos: int | Sequence[int] = -1, direction: Tensor | None = None):
        self.read_at = hook
        self.pos = pos
        self.direction = direction

    def __repr__(self) -> str:
        return f"HiddenState({self.read_at!r}, pos={self.pos})"

    def size(self, adapter):
        return 1 if self.direction is not None else adapter.d_model

    def functional(self, ctx):
        if self.direction is not None:
            return Direction(self.direction, self.pos, self.read_at).functional(ctx)
        d = ctx.adapter.d_model
        eye = torch.eye(d, device=ctx.adapter.device, dtype=ctx.adapter.dtype)
        positions = resolve_positions(self.pos, ctx)
        vectors = eye.expand(ctx.batch, d, d)
        return _place(vectors, positions, ctx.tokens.shape[1]), vectors.new_zeros(ctx.batch, d)

    def names(self, ctx):
        if self.direction is not None:
            return [f"{self.read_at}·direction"]
        return [f"{self.read_at}[{i}]" for i in range(ctx.adapter.d_model)]


def _describe_pos(pos: int | Sequence[int] | Tensor) -> str:
    return str(pos) if isinstance(pos, int) else "per-prompt"


class AttentionScore(Target):
    """Where a head looks: its pre-softmax score from ``query_pos`` to ``key_pos``.

    The score (``hook_attn_scores``: scaled, soft-capped, ALiBi added) is bilinear in the
    attention input; with the norm scales frozen, fixing the real keys makes it affine in the
    query's input (``side="query"``), fixing the real queries makes it affine in the key's input
    (``side="key"``), and ``"symmetric"`` averages the two. Every source then gets its exact share
    of the score: which tokens, heads or neurons make the head attend there (the QK circuit that a
    frozen pattern cannot credit). Read at ``ln1.hook_normalized`` (or ``hook_resid_pre``).
    """

    def __init__(
        self,
        layer: int,
        head: int,
        query_pos: int | Sequence[int] | Tensor,
        key_pos: int | Sequence[int] | Tensor,
        side: Literal["query", "key", "symmetric"] = "symmetric",
        name: str | None = None,
    ):
        if side not in ("query", "key", "symmetric"):
            raise DePassInputError(f"side must be 'query', 'key' or 'symmetric', not {side!r}")
        self.layer = layer
        self.head = head
        self.query_pos = query_pos
        self.key_pos = key_pos
        self.side = side
        self.name = name

    def __repr__(self) -> str:
        return (
            f"AttentionScore(layer={self.layer}, head={self.head}, query_pos={self.query_pos}, "
            f"key_pos={self.key_pos}, side={self.side!r})"
        )

    def _layer(self, adapter: ModelAdapter) -> int:
        n = adapter.n_layers
        if not isinstance(self.layer, int) or not -n <= self.layer < n:
            raise DePassInputError(
                f"AttentionScore: layer {self.layer!r} is out of range (0..{n - 1})"
            )
        if not isinstance(self.head, int) or not 0 <= self.head < adapter.n_heads:
            raise DePassInputError(
                f"AttentionScore: head {self.head!r} is out of range (0..{adapter.n_heads - 1})"
            )
        return self.layer % n

    def read_hook(self, adapter):
        return adapter.attention_input_hook(self._layer(adapter))

    def needed_hooks(self, adapter):
        return adapter.qk_hook_names(self._layer(adapter))

    def functional(self, ctx):
        from depass_lens.qk import (  # noqa: PLC0415 - qk imports the adapter like this module
            attention_input,
            check_positions,
            layer_qk,
            score_shares,
        )

        adapter = ctx.adapter
        layer = self._layer(adapter)
        if ctx.activations is None:
            raise DePassInputError("AttentionScore needs the real activations of the run")
        real = layer_qk(adapter, layer, ctx.activations, ctx.attention_mask)
        query = resolve_positions(self.query_pos, ctx)
        key = resolve_positions(self.key_pos, ctx)
        check_positions(query, key, real.allowed, self.head)
        normalized = ctx.activations[self.read_hook(adapter)].detach()
        rows = torch.arange(ctx.batch, device=normalized.device)
        one = normalized.new_ones(1, 1, 1, 1)
        with torch.enable_grad():  # the score is affine in the input: its gradient is the map
            leaf = normalized.clone().requires_grad_(True)
            x = attention_input(adapter, layer, leaf.unsqueeze(1), one, real.pos_embed)
            shares = score_shares(real, x, one, self.side)[:, 0]
            (weights,) = torch.autograd.grad(shares[rows, self.head, query, key].sum(), leaf)
        value = real.scores[rows, self.head, query, key]
        constants = value - (weights * normalized).sum((-1, -2))
        return weights.unsqueeze(1), constants.unsqueeze(1)

    def names(self, ctx):
        query, key = _describe_pos(self.query_pos), _describe_pos(self.key_pos)
        return [
            self.name or f"L{self.layer}H{self.head} score, query {query}, key {key} ({self.side})"
        ]


def as_targets(target: Target | Sequence[Target]) -> list[Target]:
    """Accept one target or several."""
    if isinstance(target, Target):
        return [target]
    targets = list(target)
    if not targets or not all(isinstance(t, Target) for t in targets):
        raise DePassInputError(
            "target must be a Target (Logit, LogitDiff, Direction, HiddenState, AttentionScore) "
            "or a list of them"
        )
    return targets
