"""Circuit edges computed naively from their definition, sharing no code with ``depass_lens``.

An edge ``A -> B`` is what sender A's output contributes to the target when it enters *only*
node B's input (one head's query, key or value input, an MLP's input, or the final read), in the
frozen-linearised model. The linearised model is linear, so that contribution is the model's
linear part applied to A's output placed at B's input: this file writes that linear part out
layer by layer, head by head (frozen norm scales, frozen pattern or its integrated-softmax move,
the MLP's frozen ``act(g)/g`` ratio) and pushes one injection through it per edge. GPT-2 (plain
MLP, LayerNorm, learned positions) and LLaMA (gated MLP, RMSNorm, rotary, GQA) styles, batch 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from depass_lens.adapters.base import TLModel as HookedTransformer  # either generation
from tests.naive_depass import NODES, _moved  # the same naive quadrature


def _centres(module) -> bool:
    """LayerNorm (TL 3's ``LayerNorm``/``LayerNormPre``, a bridge's norm over ``nn.LayerNorm``)."""
    inner = getattr(module, "original_component", None)
    return type(module).__name__ in ("LayerNorm", "LayerNormPre") or isinstance(
        inner, torch.nn.LayerNorm
    )


def _weight(module, name: str) -> Tensor | None:
    """A norm's weight (``w``) or bias (``b``): TL 3 names, else the wrapped ``nn.LayerNorm``'s."""
    if hasattr(module, name):
        return getattr(module, name)
    inner = getattr(module, "original_component", None)
    return getattr(inner, {"w": "weight", "b": "bias"}[name], None)


def _eps(module) -> float:
    return module.eps if hasattr(module, "eps") else module.original_component.eps


def _act(mlp):
    """The MLP's activation function (TL 3's ``act_fn``; a bridge's wrapped module's ``act``)."""
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.original_component.act


def _attn_scale(attn) -> float:
    if hasattr(attn, "attn_scale"):
        return attn.attn_scale
    return float(attn.W_Q.shape[-1]) ** 0.5  # GPT-2 style bridges (the ones these tests build)


def _norm_linear(x: Tensor, module, scale: Tensor) -> Tensor:
    """A norm's linear part with frozen scale (no bias)."""
    if _centres(module):
        x = x - x.mean(-1, keepdim=True)
    x = x / scale
    w = _weight(module, "w")
    return x * w if w is not None else x


def _kv(attn, name: str, head: int) -> Tensor:
    weight = getattr(attn, f"_{name}") if hasattr(attn, f"_{name}") else getattr(attn, name)
    return weight[head // (attn.W_Q.shape[0] // weight.shape[0])]


def _rotate(attn, x: Tensor) -> Tensor:
    """Rotary (TransformerLens's own) on ``[pos, d_head]``; identity without rotary."""
    if attn.cfg.positional_embedding_type != "rotary":
        return x
    return attn.apply_rotary(x[None, :, None, :])[0, :, 0, :]


class NaiveLinearModel:
    """The frozen-linearised model's linear part, with named injection points."""

    def __init__(self, model: HookedTransformer, tokens: Tensor, side: str = "value"):
        assert tokens.shape[0] == 1
        self.model = model
        self.side = side
        _, self.cache = model.run_with_cache(tokens)
        self.n_pos = tokens.shape[1]

    def _real_qk(self, layer: int) -> tuple[Tensor, Tensor]:
        """Real rotated queries and keys per head, ``[head, pos, d_head]``."""
        block = self.model.blocks[layer]
        attn = block.attn
        x = self.cache[f"blocks.{layer}.hook_resid_pre"][0]
        n = _norm_linear(x, block.ln1, self.cache[f"blocks.{layer}.ln1.hook_scale"][0])
        if _weight(block.ln1, "b") is not None:
            n = n + _weight(block.ln1, "b")
        q = torch.stack(
            [_rotate(attn, n @ attn.W_Q[h] + attn.b_Q[h]) for h in range(attn.W_Q.shape[0])]
        )
        k = torch.stack(
            [
                _rotate(attn, n @ _kv(attn, "W_K", h) + _kv(attn, "b_K", h))
                for h in range(attn.W_Q.shape[0])
            ]
        )
        return q, k

    @torch.no_grad()
    def target(self, injections: dict[tuple, Tensor], readout: Tensor) -> float:
        """``<readout, final>`` of the linear part with only ``injections`` as input.

        Keys: ``(layer, head, "q"|"k"|"v")``, ``(layer, "mlp")``, ``("final",)``; values
        ``[pos, d_model]`` added to that one input. ``readout``: ``[pos, d_model]`` weights on
        the final-norm output.
        """
        model, cache = self.model, self.cache
        d = model.cfg.d_model
        x = torch.zeros(self.n_pos, d, dtype=readout.dtype)
        causal = torch.ones(self.n_pos, self.n_pos, dtype=torch.bool).tril()
        uniform = causal.to(x.dtype) / causal.sum(-1, keepdim=True)
        w_pattern = {"value": 0.0, "pattern": 1.0, "symmetric": 0.5}[self.side]
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            scale = cache[f"blocks.{layer}.ln1.hook_scale"][0]
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
            scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0]
            v_real = cache[f"blocks.{layer}.attn.hook_v"][0]
            q_real, k_real = self._real_qk(layer)
            attn_out = torch.zeros_like(x)
            for h in range(attn.W_Q.shape[0]):
                inputs = {
                    s: _norm_linear(
                        x + injections.get((layer, h, s), torch.zeros_like(x)), block.ln1, scale
                    )
                    for s in "qkv"
                }
                v = inputs["v"] @ _kv(attn, "W_V", h)
                mixing = {"value": pattern[h], "pattern": uniform}.get(
                    self.side, 0.5 * (pattern[h] + uniform)
                )
                z = mixing @ v
                if w_pattern:
                    q = _rotate(attn, inputs["q"] @ attn.W_Q[h])
                    k = _rotate(attn, inputs["k"] @ _kv(attn, "W_K", h))
                    share = (q @ k_real[h].T + q_real[h] @ k.T) / (2 * _attn_scale(attn))
                    real = torch.where(causal, scores[h], torch.zeros_like(scores[h]))
                    moved = _moved(real, torch.where(causal, share, torch.zeros_like(share)))
                    kv = h // (attn.W_Q.shape[0] // v_real.shape[1])
                    z = z + w_pattern * moved @ v_real[:, kv]
                attn_out = attn_out + z @ attn.W_O[h]
            x = x + attn_out
            mlp = block.mlp
            mlp_in = x + injections.get((layer, "mlp"), torch.zeros_like(x))
            n = _norm_linear(mlp_in, block.ln2, cache[f"blocks.{layer}.ln2.hook_scale"][0])
            g = cache[f"blocks.{layer}.mlp.hook_pre"][0]
            ratio = _act(mlp)(g) / g
            if (
                getattr(mlp, "W_gate", None) is not None
            ):  # taylor, gate side: r * (share of the gate) * real up
                up = cache[f"blocks.{layer}.mlp.hook_pre_linear"][0]
                post = ratio * (n @ mlp.W_gate) * up
            else:
                post = ratio * (n @ mlp.W_in)
            x = x + post @ mlp.W_out
        x = x + injections.get(("final",), torch.zeros_like(x))
        final = _norm_linear(x, model.ln_final, cache["ln_final.hook_scale"][0])
        return float((final * readout).sum())

    @torch.no_grad()
    def sender_output(self, name: str) -> Tensor:
        """What a sender writes into the stream (``embed``, ``L1H2``, ``L0.mlp``, ``L0.b_O``)."""
        cache, model = self.cache, self.model
        if name == "embed":
            out = cache["hook_embed"][0]
            if model.cfg.positional_embedding_type == "standard":
                out = out + cache["hook_pos_embed"][0]
            return out
        layer = int(name[1 : name.index(".") if "." in name else name.index("H")])
        if name.endswith(".mlp"):
            return cache[f"blocks.{layer}.hook_mlp_out"][0]
        if name.endswith(".b_O"):
            return model.blocks[layer].attn.b_O.expand(self.n_pos, -1)
        head = int(name[name.index("H") + 1 :])
        z = cache[f"blocks.{layer}.attn.hook_z"][0, :, head]
        return z @ model.blocks[layer].attn.W_O[head]


def receiver_key(name: str, kind: str) -> tuple:
    """The injection key of a receiver named as in the graph (``L1H2``/q, ``L0.mlp``, logits)."""
    if name == "logits":
        return ("final",)
    if name.endswith(".mlp"):
        return (int(name[1 : name.index(".")]), "mlp")
    layer, head = name[1:].split("H")
    return (int(layer), int(head), kind)


def _secant(act, x: Tensor, y: Tensor) -> Tensor:
    gap = x - y
    small = gap.abs() < 1e-9
    tangent = (act(x + 1e-6) - act(x - 1e-6)) / 2e-6
    return torch.where(small, tangent, (act(x) - act(y)) / torch.where(small, 1.0, gap))


def _norm_secant(delta: Tensor, module, x_in: Tensor, y_in: Tensor) -> Tensor:
    """Exact change of a norm's output for an input change ``delta`` between inputs x and y."""
    centre = _centres(module)
    if centre:
        x_in = x_in - x_in.mean(-1, keepdim=True)
        y_in = y_in - y_in.mean(-1, keepdim=True)
        delta = delta - delta.mean(-1, keepdim=True)
    eps = _eps(module)
    s_x = (x_in.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    s_y = (y_in.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    d = delta.shape[-1]
    inner = (delta * (x_in + y_in)).sum(-1, keepdim=True) / d
    out = delta / s_x - y_in * inner / ((s_x + s_y) * s_x * s_y)
    w = _weight(module, "w")
    return out * w if w is not None else out


def _path_moved(start: Tensor, end: Tensor, share: Tensor) -> Tensor:
    """``int_0^1 J(start + a (end - start)) share da``, row by row over the causal keys."""
    nodes, weights = np.polynomial.legendre.leggauss(NODES)
    out = torch.zeros_like(share)
    for i in range(start.shape[0]):
        s0, s1, v = start[i, : i + 1], end[i, : i + 1], share[i, : i + 1]
        for x, w in zip(nodes, weights):
            p = torch.softmax(s0 + float((x + 1) / 2) * (s1 - s0), 0)
            out[i, : i + 1] += float(w / 2) * (p * v - p * (p @ v))
    return out


class NaiveDifferenceModel:
    """The exact secant map of changes from a corrupted run, layer by layer, head by head
    (GPT-2 and LLaMA styles, batch 1), with the same injection points as
    :class:`NaiveLinearModel`."""

    def __init__(self, model: HookedTransformer, clean: Tensor, corrupt: Tensor):
        self.model = model
        _, self.x = model.run_with_cache(clean)
        _, self.y = model.run_with_cache(corrupt)
        self.n_pos = clean.shape[1]

    def _qkv(self, cache, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries, keys and values per query head, ``[head, pos, d_head]``."""
        block = self.model.blocks[layer]
        attn = block.attn
        n = block.ln1(cache[f"blocks.{layer}.hook_resid_pre"][0])
        heads = range(attn.W_Q.shape[0])
        q = torch.stack([_rotate(attn, n @ attn.W_Q[h] + attn.b_Q[h]) for h in heads])
        k = torch.stack(
            [_rotate(attn, n @ _kv(attn, "W_K", h) + _kv(attn, "b_K", h)) for h in heads]
        )
        v = torch.stack([n @ _kv(attn, "W_V", h) + _kv(attn, "b_V", h) for h in heads])
        return q, k, v

    @torch.no_grad()
    def target(self, injections: dict[tuple, Tensor], readout: Tensor) -> float:
        model, x_c, y_c = self.model, self.x, self.y
        delta = torch.zeros(self.n_pos, model.cfg.d_model, dtype=readout.dtype)
        causal = torch.ones(self.n_pos, self.n_pos, dtype=torch.bool).tril()
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            x_in, y_in = (
                x_c[f"blocks.{layer}.hook_resid_pre"][0],
                y_c[f"blocks.{layer}.hook_resid_pre"][0],
            )
            qx, kx, vx = self._qkv(x_c, layer)
            qy, ky, vy = self._qkv(y_c, layer)
            ax = x_c[f"blocks.{layer}.attn.hook_pattern"][0]
            ay = y_c[f"blocks.{layer}.attn.hook_pattern"][0]
            sx = x_c[f"blocks.{layer}.attn.hook_attn_scores"][0]
            sy = y_c[f"blocks.{layer}.attn.hook_attn_scores"][0]
            out = torch.zeros_like(delta)
            for h in range(attn.W_Q.shape[0]):
                d = {
                    s: _norm_secant(
                        delta + injections.get((layer, h, s), torch.zeros_like(delta)),
                        block.ln1,
                        x_in,
                        y_in,
                    )
                    for s in "qkv"
                }
                dq = _rotate(attn, d["q"] @ attn.W_Q[h])
                dk = _rotate(attn, d["k"] @ _kv(attn, "W_K", h))
                dv = d["v"] @ _kv(attn, "W_V", h)
                ds = (dq @ ((kx[h] + ky[h]) / 2).T + ((qx[h] + qy[h]) / 2) @ dk.T) / _attn_scale(
                    attn
                )
                zero = torch.zeros_like(ds)
                start = torch.where(causal, sy[h], zero)
                end = torch.where(causal, sx[h], zero)
                moved = _path_moved(start, end, torch.where(causal, ds, zero))
                dz = (ax[h] + ay[h]) / 2 @ dv + moved @ ((vx[h] + vy[h]) / 2)
                out = out + dz @ attn.W_O[h]
            delta = delta + out
            mlp = block.mlp
            x_mid, y_mid = (
                x_c[f"blocks.{layer}.hook_resid_mid"][0],
                y_c[f"blocks.{layer}.hook_resid_mid"][0],
            )
            d_in = _norm_secant(
                delta + injections.get((layer, "mlp"), torch.zeros_like(delta)),
                block.ln2,
                x_mid,
                y_mid,
            )
            gx, gy = x_c[f"blocks.{layer}.mlp.hook_pre"][0], y_c[f"blocks.{layer}.mlp.hook_pre"][0]
            slope = _secant(_act(mlp), gx, gy)
            if getattr(mlp, "W_gate", None) is not None:
                ux = x_c[f"blocks.{layer}.mlp.hook_pre_linear"][0]
                uy = y_c[f"blocks.{layer}.mlp.hook_pre_linear"][0]
                mean_act = (_act(mlp)(gx) + _act(mlp)(gy)) / 2
                d_post = slope * (d_in @ mlp.W_gate) * (ux + uy) / 2 + mean_act * (d_in @ mlp.W_in)
            else:
                d_post = slope * (d_in @ mlp.W_in)
            delta = delta + d_post @ mlp.W_out
        delta = delta + injections.get(("final",), torch.zeros_like(delta))
        n_layers = model.cfg.n_layers
        x_f = x_c[f"blocks.{n_layers - 1}.hook_resid_post"][0]
        y_f = y_c[f"blocks.{n_layers - 1}.hook_resid_post"][0]
        final = _norm_secant(delta, model.ln_final, x_f, y_f)
        return float((final * readout).sum())

    @torch.no_grad()
    def sender_change(self, name: str) -> Tensor:
        """A sender's output change clean - corrupt (``embed``, ``L1H2``, ``L0.mlp``)."""
        outputs = []
        for cache in (self.x, self.y):
            naive = object.__new__(NaiveLinearModel)
            naive.model, naive.cache, naive.n_pos = self.model, cache, self.n_pos
            outputs.append(naive.sender_output(name))
        return outputs[0] - outputs[1]
