"""A deliberately naive DePass, written from the formulas alone, to check the engine against.

It shares no code with ``depass_lens``: weights are read from the TransformerLens modules, frozen
values from a plain ``run_with_cache``, components are a Python list of ``[pos, d]`` tensors, and
each MLP rule is its textbook formula applied neuron-wise. Slow and batch-1 on purpose. Covers the
GPT-2 (LayerNorm, learned positions, biases, plain MLP) and LLaMA (RMSNorm, rotary, GQA, gated MLP)
families.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformer_lens import HookedTransformer


def _norm(comps: list[Tensor], module, scale: Tensor) -> list[Tensor]:
    """Frozen norm: centre (LayerNorm), divide by the real scale, weight; bias to the last comp."""
    kind = type(module).__name__
    out = []
    for c in comps:
        x = c - c.mean(-1, keepdim=True) if kind in ("LayerNorm", "LayerNormPre") else c
        x = x / scale
        if hasattr(module, "w"):
            x = x * module.w
        out.append(x)
    if hasattr(module, "b"):
        out[-1] = out[-1] + module.b
    return out


def _attention(comps: list[Tensor], attn, pattern: Tensor) -> list[Tensor]:
    """Each component's values mixed by the real pattern and projected by W_O (biases to bias)."""
    W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V  # [kv_head, d, d_head]
    b_V = attn._b_V if hasattr(attn, "_b_V") else attn.b_V
    n_heads = attn.W_O.shape[0]
    repeat = n_heads // W_V.shape[0]
    out = []
    for i, c in enumerate(comps):
        total = torch.zeros_like(c)
        for h in range(n_heads):
            v = c @ W_V[h // repeat]
            if i == len(comps) - 1:
                v = v + b_V[h // repeat]
            total = total + (pattern[h] @ v) @ attn.W_O[h]
        out.append(total)
    out[-1] = out[-1] + attn.b_O
    return out


def _weights(shares: Tensor, rule: str, parity: bool, pos: int) -> Tensor:
    """Split weights over components for one neuron at one position (``shares``: [comp])."""
    n = len(shares)
    present = shares != 0
    if parity:
        if pos == 0:
            return torch.eye(n, dtype=shares.dtype)[0]
        present[0] = False  # the BOS component gets nothing after position 0
        present[-1] = present[-1] & (shares[-1].abs() >= 1e-5)
    if not present.any():
        return torch.eye(n, dtype=shares.dtype)[-1]
    g = torch.where(present, shares, torch.zeros_like(shares))
    if rule == "softmax":
        logits = torch.where(present, g / 0.1, torch.full_like(g, -torch.inf))
        return torch.softmax(logits, 0)
    if rule == "max":
        best = int(torch.where(present, g, torch.full_like(g, -torch.inf)).argmax())
        return torch.eye(n, dtype=shares.dtype)[best]
    if rule == "relu":
        positive = g.clamp_min(0)
        if positive.sum() > 0:
            return positive / positive.sum()
        if g.sum() != 0:
            return g / g.sum()
        return torch.eye(n, dtype=shares.dtype)[-1]
    if rule == "linear":
        low = g[present].min()
        centred = torch.where(present, g - low, torch.zeros_like(g))
        if centred.sum() != 0:
            return centred / centred.sum()
        return present.to(g.dtype) / present.sum()
    raise ValueError(rule)


def _mlp(comps: list[Tensor], mlp, rule: str, parity: bool) -> list[Tensor]:
    """Neuron values split among components by ``rule``, then projected by W_out."""
    gated = hasattr(mlp, "W_gate")
    gate = [c @ (mlp.W_gate if gated else mlp.W_in) for c in comps]  # each [pos, d_mlp]
    if not gated:
        gate[-1] = gate[-1] + mlp.b_in
    up = [c @ mlp.W_in for c in comps] if gated else None
    g = torch.stack(gate)  # comp pos d_mlp
    real_g = g.sum(0)
    act = mlp.act_fn(real_g)
    value = act * torch.stack(up).sum(0) if up is not None else act
    post = torch.zeros_like(g)
    if rule == "taylor":
        ratio = act / real_g
        post = ratio * g * (torch.stack(up).sum(0) if up is not None else 1)
    else:
        for p in range(g.shape[1]):
            for n in range(g.shape[2]):
                post[:, p, n] = _weights(g[:, p, n], rule, parity, p) * value[p, n]
    if gated:
        post[-1] = post[-1] + mlp.b_in
    out = [post[i] @ mlp.W_out for i in range(len(comps))]
    out[-1] = out[-1] + mlp.b_out
    return out


@torch.no_grad()
def naive_token_depass(
    model: HookedTransformer, tokens: Tensor, rule: str, parity: bool = False
) -> Tensor:
    """Token components (one per position + bias) at ``unembed.hook_in``: ``[comp, pos, d]``."""
    assert tokens.shape[0] == 1, "batch 1 only"
    _, cache = model.run_with_cache(tokens)
    n_pos = tokens.shape[1]
    embed = cache["hook_embed"][0]
    if model.cfg.positional_embedding_type == "standard":
        embed = embed + cache["hook_pos_embed"][0]
    comps = []
    for t in range(n_pos):
        c = torch.zeros_like(embed)
        c[t] = embed[t]
        comps.append(c)
    comps.append(torch.zeros_like(embed))  # bias
    for layer, block in enumerate(model.blocks):
        s1 = cache[f"blocks.{layer}.ln1.hook_scale"][0]
        s2 = cache[f"blocks.{layer}.ln2.hook_scale"][0]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
        attn_out = _attention(_norm(comps, block.ln1, s1), block.attn, pattern)
        comps = [c + a for c, a in zip(comps, attn_out)]
        mlp_out = _mlp(_norm(comps, block.ln2, s2), block.mlp, rule, parity)
        comps = [c + m for c, m in zip(comps, mlp_out)]
    final = _norm(comps, model.ln_final, cache["ln_final.hook_scale"][0])
    return torch.stack(final)
