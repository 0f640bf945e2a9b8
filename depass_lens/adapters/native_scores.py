"""Real attention scores for TransformerLens 4's native attention.

A ``boot_native`` model's attention returns ``(output, pattern)``; the bridge then fires
``hook_attn_scores`` *after* the attention has run, with that second element, i.e. with the
softmaxed pattern, not the pre-softmax scores (TransformerLens 4.3, ``AttentionBridge``'s
post-hoc hook). The QK path needs the scores, and needs them before ``hook_z``. HF-backed bridges
fire real scores in order; this module repairs native ones:

:func:`repair_native_scores` switches each native attention module to
:class:`ScoredNativeAttention`, which computes exactly what ``NativeAttention`` computes (same
operations, same order) but passes the masked, soft-capped scores through the bridge's own
``hook_attn_scores`` before the softmax, and no longer returns the pattern for the bridge to
fire a second time (the pattern is hooked inside, through ``pattern_fn``, as before).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _native_attention_class() -> type | None:
    try:
        from transformer_lens.model_bridge.sources.native.model import NativeAttention
    except ImportError:
        return None
    return NativeAttention


@cache
def _scored_class(native: type) -> type:
    return type("ScoredNativeAttention", (native,), {"forward": _scored_forward})


def _scored_forward(
    self: Any,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    pattern_fn: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``NativeAttention.forward`` with the scores hooked before the softmax."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    batch, seq, _ = hidden_states.shape
    q = self.q(hidden_states).view(batch, seq, self.n_heads, self.d_head).transpose(1, 2)
    k = self.k(hidden_states).view(batch, seq, self.n_kv_heads, self.d_head).transpose(1, 2)
    v = self.v(hidden_states).view(batch, seq, self.n_kv_heads, self.d_head).transpose(1, 2)
    if self.rotary is not None:
        q, k = self.rotary.apply_rope(q, k, position_ids=position_ids)
    if self.kv_repeats > 1:
        k = k.repeat_interleave(self.kv_repeats, dim=1)
        v = v.repeat_interleave(self.kv_repeats, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / self.scale
    scores = apply_softcap(scores, self.attn_scores_soft_cap)
    if self.causal:
        block_mask = self.causal_mask[:seq, :seq]
    else:
        block_mask = torch.zeros(seq, seq, dtype=torch.bool, device=scores.device)
    if attention_mask is not None:
        block_mask = self._combine_attention_mask(block_mask, attention_mask, batch=batch)
    scores = scores.masked_fill(block_mask, float("-inf"))
    scores = self.__dict__["_depass_scores_hook"](scores)
    pattern = F.softmax(scores, dim=-1)
    pattern = pattern.masked_fill(block_mask, 0.0)
    if pattern_fn is not None:
        pattern = pattern_fn(pattern)
    attn = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(batch, seq, -1)
    return self.o(attn), None


def needs_repair(bridge: Any) -> bool:
    """Whether ``bridge`` has native attention whose ``hook_attn_scores`` holds the pattern."""
    native = _native_attention_class()
    if native is None:
        return False
    return any(
        isinstance(block.attn.original_component, native)
        and "_depass_scores_hook" not in block.attn.original_component.__dict__
        for block in bridge.blocks
    )


def repair_native_scores(bridge: Any) -> Any:
    """Make ``bridge``'s native attention fire real pre-softmax scores at ``hook_attn_scores``,
    before the pattern and ``hook_z``; the function the model computes is unchanged. Returns
    ``bridge``. A no-op for bridges without native attention."""
    native = _native_attention_class()
    if native is None:
        return bridge
    scored = _scored_class(native)
    for block in bridge.blocks:
        inner = block.attn.original_component
        if isinstance(inner, native) and "_depass_scores_hook" not in inner.__dict__:
            inner.__dict__["_depass_scores_hook"] = block.attn.hook_attn_scores  # no submodule
            inner.__class__ = scored
    return bridge


__all__ = ["needs_repair", "repair_native_scores"]
