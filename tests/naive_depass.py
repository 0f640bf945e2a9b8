"""A deliberately naive DePass, written from the formulas alone, to check the engine against.

It shares no code with ``depass_lens``: weights are read from the TransformerLens modules, frozen
values from a plain ``run_with_cache``, components are a Python list of ``[pos, d]`` tensors, and
each MLP rule is its textbook formula applied neuron-wise. Slow and batch-1 on purpose. Covers the
GPT-2 (LayerNorm, learned positions, biases, plain MLP) and LLaMA (RMSNorm, rotary, GQA, gated MLP)
families.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from depass_lens.adapters.base import TLModel as HookedTransformer  # either generation

#: Fixed quadrature for the naive pattern side (the engine is given the same count to compare).
NODES = 64


# Under TransformerLens 4 the model is a ``TransformerBridge`` over TL's native model: the same
# quantities under other names, read by the few accessors below (norm kind and weights, the
# activation, the attention scale, rotary).


def _centres(module) -> bool:
    """A LayerNorm (TL 3's ``LayerNorm``/``LayerNormPre``, a bridge over ``nn.LayerNorm``)."""
    inner = getattr(module, "original_component", None)
    return type(module).__name__ in ("LayerNorm", "LayerNormPre") or isinstance(
        inner, torch.nn.LayerNorm
    )


def _norm(comps: list[Tensor], module, scale: Tensor) -> list[Tensor]:
    """Frozen norm: centre (LayerNorm), divide by the real scale, weight; bias to the last comp."""
    centre = _centres(module)
    w, b = getattr(module, "w", None), getattr(module, "b", None)
    out = []
    for c in comps:
        x = c - c.mean(-1, keepdim=True) if centre else c
        x = x / scale
        if w is not None:
            x = x * w
        out.append(x)
    if b is not None:
        out[-1] = out[-1] + b
    return out


def _act(mlp):
    """The MLP's activation (TL 3's ``act_fn``; a bridge's wrapped native module's ``act``)."""
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.original_component.act


def _attn_scale(attn) -> float:
    """What the scores are divided by (TL 3's ``attn_scale``; the native module's ``scale``)."""
    return attn.attn_scale if hasattr(attn, "attn_scale") else attn.original_component.scale


def _rotate(attn, x: Tensor) -> Tensor:
    """The model's own rotary on ``[pos, head, d_head]`` (TL 3's ``apply_rotary``; the native
    model's ``apply_rope`` on ``[batch, head, pos, d_head]``); identity without rotary."""
    cfg = attn.cfg if hasattr(attn, "cfg") else attn.config
    if cfg.positional_embedding_type != "rotary":
        return x
    if hasattr(attn, "apply_rotary"):
        return attn.apply_rotary(x[None])[0]
    heads_first = x.transpose(0, 1)[None]
    rotated, _ = attn.original_component.rotary.apply_rope(heads_first, heads_first)
    return rotated[0].transpose(0, 1)


def _grouped(attn, name: str) -> Tensor:
    return getattr(attn, f"_{name}") if hasattr(attn, f"_{name}") else getattr(attn, name)


def _qk(attn, c: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    """Rotated queries and keys (keys repeated per head) of one component ``[pos, d]``."""
    W_K, b_K = _grouped(attn, "W_K"), _grouped(attn, "b_K")
    q = torch.einsum("pd,hde->phe", c, attn.W_Q) + (attn.b_Q if with_bias else 0)
    k = torch.einsum("pd,hde->phe", c, W_K) + (b_K if with_bias else 0)
    q, k = _rotate(attn, q), _rotate(attn, k)
    k = k.repeat_interleave(attn.W_Q.shape[0] // W_K.shape[0], dim=1)
    return q, k


def _moved(scores: Tensor, share: Tensor) -> Tensor:
    """int_0^1 J(a s) share da for one head, row by row (causal rows), by Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(NODES)
    out = torch.zeros_like(share)
    for i in range(scores.shape[0]):
        s, v = scores[i, : i + 1], share[i, : i + 1]
        for x, w in zip(nodes, weights):
            p = torch.softmax((x + 1) / 2 * s, 0)
            out[i, : i + 1] += w / 2 * (p * v - p * (p @ v))
    return out


def _attention(comps: list[Tensor], attn, pattern: Tensor, side: str = "value") -> list[Tensor]:
    """Each component's values mixed by the real pattern and projected by W_O (biases to bias);
    on the pattern side also its share of the pattern's move from uniform, applied to the values.
    """
    W_V, b_V = _grouped(attn, "W_V"), _grouped(attn, "b_V")
    n_heads = attn.W_O.shape[0]
    repeat = n_heads // W_V.shape[0]
    last = len(comps) - 1
    values = [
        torch.stack(
            [c @ W_V[h // repeat] + (b_V[h // repeat] if i == last else 0) for h in range(n_heads)]
        )
        for i, c in enumerate(comps)
    ]  # each [head, pos, d_head]
    v_real = sum(values)
    n_pos = comps[0].shape[0]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    uniform = causal.to(pattern.dtype) / causal.sum(-1, keepdim=True)
    q, k = _qk(attn, sum(comps), True)
    scores = torch.einsum("ihe,jhe->hij", q, k) / _attn_scale(attn)
    w_pattern = {"value": 0.0, "pattern": 1.0, "symmetric": 0.5}[side]
    mixing = {"value": pattern, "pattern": uniform.expand_as(pattern)}.get(
        side, 0.5 * (pattern + uniform)
    )
    out = []
    for i, c in enumerate(comps):
        total = torch.zeros_like(c)
        q_c, k_c = _qk(attn, c, i == last)
        for h in range(n_heads):
            z = mixing[h] @ values[i][h]
            if w_pattern:
                share = (q_c[:, h] @ k[:, h].T + q[:, h] @ k_c[:, h].T) / (2 * _attn_scale(attn))
                moved = _moved(scores[h], torch.where(causal, share, 0.0))
                if i == last:  # the quadrature's remainder keeps the split exact
                    moved = (
                        moved
                        + (pattern[h] - uniform)
                        - _moved(scores[h], torch.where(causal, scores[h], 0.0))
                    )
                z = z + w_pattern * moved @ v_real[h]
            total = total + z @ attn.W_O[h]
        out.append(total)
    out[-1] = out[-1] + attn.b_O
    return out


def _reference_shares(shares: Tensor, pos: int, bos: bool) -> Tensor:
    """The reference's edits of one neuron's shares, its components ordered ``[first, ..., last]``.

    With ``bos`` (token level) the first component's share is zeroed; at position 0 it is then set
    to 1.0; the last's share below 1e-5 is zeroed; if no share is left, the last one's becomes 1.0.
    """
    g = shares.clone()
    if bos:
        g[0] = 0.0
    if pos == 0:
        g[0] = 1.0
    if g[-1].abs() < 1e-5:
        g[-1] = 0.0
    if (g == 0).all():
        g[-1] = 1.0
    return g


def _weights(shares: Tensor, rule: str, parity: bool, pos: int, bos: bool = True) -> Tensor:
    """Split weights over components for one neuron at one position (``shares``: [comp])."""
    n = len(shares)
    if parity:
        shares = _reference_shares(shares, pos, bos)
    present = shares != 0
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


def _mlp(comps: list[Tensor], mlp, rule: str, parity: bool, bos: bool = True) -> list[Tensor]:
    """Neuron values split among components by ``rule``, then projected by W_out."""
    gated = getattr(mlp, "W_gate", None) is not None
    gate = [c @ (mlp.W_gate if gated else mlp.W_in) for c in comps]  # each [pos, d_mlp]
    if not gated:
        gate[-1] = gate[-1] + mlp.b_in
    up = [c @ mlp.W_in for c in comps] if gated else None
    g = torch.stack(gate)  # comp pos d_mlp
    real_g = g.sum(0)
    act = _act(mlp)(real_g)
    value = act * torch.stack(up).sum(0) if up is not None else act
    post = torch.zeros_like(g)
    if rule == "taylor":
        ratio = act / real_g
        post = ratio * g * (torch.stack(up).sum(0) if up is not None else 1)
    else:
        for p in range(g.shape[1]):
            for n in range(g.shape[2]):
                post[:, p, n] = _weights(g[:, p, n], rule, parity, p, bos) * value[p, n]
    if gated and mlp.b_in is not None:  # the native gated MLP has no b_in
        post[-1] = post[-1] + mlp.b_in
    out = [post[i] @ mlp.W_out for i in range(len(comps))]
    if mlp.b_out is not None:  # the native gated MLP of a bias-free model has none
        out[-1] = out[-1] + mlp.b_out
    return out


@torch.no_grad()
def naive_token_depass(
    model: HookedTransformer,
    tokens: Tensor,
    rule: str,
    parity: bool = False,
    attention: str = "value",
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
        attn_out = _attention(_norm(comps, block.ln1, s1), block.attn, pattern, attention)
        comps = [c + a for c, a in zip(comps, attn_out)]
        mlp_out = _mlp(_norm(comps, block.ln2, s2), block.mlp, rule, parity)
        comps = [c + m for c, m in zip(comps, mlp_out)]
    final = _norm(comps, model.ln_final, cache["ln_final.hook_scale"][0])
    return torch.stack(final)


def without_biases(model: HookedTransformer) -> HookedTransformer:
    """Zero every bias in place (a real LLaMA has none; the reference formulas assume that)."""
    with torch.no_grad():
        for name, param in _tl_named_parameters(model):
            if name.split(".")[-1].lstrip("_").startswith("b_"):
                param.zero_()
    return model


def _tl_named_parameters(model: HookedTransformer):
    """Parameters by TransformerLens names: on a TL 4 bridge, its wrapped module's projection
    biases (``...q.bias`` as ``b_q``; norm biases, TL 3's ``ln.b``, are not ``b_`` here either)."""
    if not hasattr(model, "original_model"):
        return model.named_parameters()
    return [
        (name.replace("bias", "b_"), param)
        for name, param in model.original_model.named_parameters()
        if name.endswith("bias") and ".ln" not in name and "ln_" not in name
    ]


def _has_biases(model: HookedTransformer) -> bool:
    return any(
        name.split(".")[-1].lstrip("_").startswith("b_") and bool(param.abs().max() > 0)
        for name, param in _tl_named_parameters(model)
        if not name.endswith("b_U")
    )


def _reference_start(cache, model: HookedTransformer, level: str, layer: int) -> list[Tensor]:
    """The reference's start components ``[rest, unit_1, ..., unit_n]`` (each ``[pos, d]``).

    ``heads``/``attn`` live after the attention (rest = the stream before it), ``mlp``/``neurons``
    after the MLP. The neurons' rest is the stream before the MLP, so the components sum to the
    state after it (the reference's ``resid_mid - sum(neurons)`` is a bug not reproduced).
    """
    pre, mid, post = (cache[f"blocks.{layer}.hook_resid_{s}"][0] for s in ("pre", "mid", "post"))
    block = model.blocks[layer]
    if level == "heads":
        z = cache[f"blocks.{layer}.attn.hook_z"][0]  # pos head d_head
        return [pre] + [z[:, h] @ block.attn.W_O[h] for h in range(z.shape[1])]
    if level == "attn":
        return [pre, mid - pre]
    if level == "mlp":
        return [mid, post - mid]
    if level == "neurons":
        hidden = cache[f"blocks.{layer}.mlp.hook_post"][0]  # pos d_mlp
        units = [hidden[:, n, None] * block.mlp.W_out[n] for n in range(hidden.shape[1])]
        return [post - sum(units)] + units
    raise ValueError(level)


@torch.no_grad()
def naive_reference_depass(
    model: HookedTransformer, tokens: Tensor, rule: str, level: str, layer: int = 0
) -> Tensor:
    """The reference's head-, module- and neuron-level DePass at ``unembed.hook_in``.

    Components in the reference's order ``[rest, unit_1, ..., unit_n]``; at every MLP after the
    start the reference's conventions act on the first (rest) and the last (the last unit)
    component, with no BOS convention. The reference has no bias component: the model must have
    none (like LLaMA), so that nothing is lost. Returns ``[comp, pos, d]``.
    """
    assert tokens.shape[0] == 1, "batch 1 only"
    assert not _has_biases(model), "the reference formulas assume a model without biases"
    _, cache = model.run_with_cache(tokens)
    comps = _reference_start(cache, model, level, layer)
    for index in range(layer, model.cfg.n_layers):
        block = model.blocks[index]
        s1 = cache[f"blocks.{index}.ln1.hook_scale"][0]
        s2 = cache[f"blocks.{index}.ln2.hook_scale"][0]
        if index > layer:
            pattern = cache[f"blocks.{index}.attn.hook_pattern"][0]
            attn_out = _attention(_norm(comps, block.ln1, s1), block.attn, pattern)
            comps = [c + a for c, a in zip(comps, attn_out)]
        if index > layer or level in ("heads", "attn"):
            mlp_out = _mlp(_norm(comps, block.ln2, s2), block.mlp, rule, True, bos=False)
            comps = [c + m for c, m in zip(comps, mlp_out)]
    final = _norm(comps, model.ln_final, cache["ln_final.hook_scale"][0])
    return torch.stack(final)
