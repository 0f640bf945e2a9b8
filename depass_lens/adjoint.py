"""Adjoint mode: every component's score from one forward and one backward pass per target.

With a linear MLP rule (``taylor``) the decomposed pass is a fixed linear map of the initial
components plus a constant. So a component's share of a scalar target equals ``<grad, component>``,
where ``grad`` is the gradient of the target with respect to the start hook on the
*frozen-linearised* model: norm scales and attention patterns detached, and each MLP activation
replaced by its frozen ratio ``act(g)/g`` (or the chosen gated side). We get that graph by
running the real ``HookedTransformer`` with TransformerLens hooks that detach exactly those
quantities; the values of the forward pass are unchanged. This path shares no propagation code
with forward mode, which makes their agreement (a standing test) an independent check of both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.adapter import MLPWeights, ModelAdapter
from depass_lens.integrated_softmax import IntegratedSoftmax
from depass_lens.qk import AttentionSplit, attention_input, layer_qk, score_shares
from depass_lens.rules import NeuronValues, TaylorRule

HookFn = Callable[..., Tensor | None]


@dataclass
class AdjointPass:
    """Result of one linearised forward: detached activations and a way to take gradients."""

    activations: dict[str, Tensor]  # detached copies of every stored hook
    live: dict[str, Tensor]  # the same tensors, still in the graph

    def gradients(
        self, scalar: Tensor, hooks: Iterable[str], retain_graph: bool
    ) -> dict[str, Tensor]:
        names = list(dict.fromkeys(hooks))
        tensors = [self.live[name] for name in names]
        grads = torch.autograd.grad(scalar, tensors, retain_graph=retain_graph, allow_unused=True)
        return {
            name: grad if grad is not None else torch.zeros_like(tensor)
            for name, grad, tensor in zip(names, grads, tensors)
        }


def linearising_hooks(
    adapter: ModelAdapter,
    rule: TaylorRule,
    split: AttentionSplit | None = None,
    attention_mask: Tensor | None = None,
) -> list[tuple[str, HookFn]]:
    """TransformerLens forward hooks that turn the model into its frozen-linearised version."""
    hooks: list[tuple[str, HookFn]] = []

    def detach(value: Tensor, hook) -> Tensor:
        return value.detach()

    for name in adapter.frozen_hook_names():
        if name.endswith(("hook_scale", "hook_pattern", "hook_expert_weights")):
            hooks.append((name, detach))
    if split is not None and split.uses_pattern:
        for layer in range(adapter.n_layers):
            hooks += _attention_hooks(adapter, layer, split, attention_mask)
    if adapter.attn_only:
        return hooks
    for layer in range(adapter.n_layers):
        hooks += _mlp_linearising_hooks(adapter, layer, rule)
    return hooks


def _attention_hooks(
    adapter: ModelAdapter, layer: int, split: AttentionSplit, attention_mask: Tensor | None
) -> list[tuple[str, HookFn]]:
    """Pattern-side split on the real model: ``z`` keeps its value, its gradient follows the split.

    Queries and keys are rebuilt from the live attention input with frozen norm scales (the QK
    path of :mod:`depass_lens.qk`); at ``hook_z`` the term
    ``(P_v - A) v + w_p M(s) v_real`` is added and subtracted (value zero), so ``v`` is mixed by
    the split's value pattern ``P_v`` and the scores reach the output through ``M`` (whose
    forward value is never needed, so only its backward pass is computed).
    """
    prefix = f"blocks.{layer}.attn"
    input_hook = adapter.attention_input_hook(layer)
    weights = adapter.attention(layer)
    seen: dict[str, Tensor] = {}

    def store(key: str, frozen: bool = False) -> HookFn:
        def fn(value: Tensor, hook) -> Tensor:
            seen[key] = value.detach() if frozen else value
            return seen[key]

        return fn

    def steer(z: Tensor, hook) -> Tensor:
        live = seen[input_hook]
        real_acts = {name: value.detach() for name, value in seen.items()}
        real = layer_qk(adapter, layer, real_acts, attention_mask)
        pattern = seen[f"{prefix}.hook_pattern"].to(real.scores.dtype)
        integrated = IntegratedSoftmax(
            real.scores, real.allowed, pattern, split.nodes, exact=False
        )  # the remainder is a constant: it only reaches bias, which is target minus the rest
        one = live.new_ones(1, 1, 1, 1)
        x = attention_input(adapter, layer, live.unsqueeze(1), one, real.pos_embed)
        moved = integrated.gradient_path(score_shares(real, x, one))[:, 0]  # value 0, grad M
        v = seen[f"{prefix}.hook_v"]
        if weights.kv_repeat > 1:
            v = torch.repeat_interleave(v, weights.kv_repeat, dim=2)
        mixing = split.value_pattern(pattern, integrated.uniform) - pattern
        correction = einops.einsum(mixing.to(v.dtype), v, "b h q k, b k h d -> b q h d")
        correction = correction + split.pattern_weight * einops.einsum(
            moved.to(v.dtype), v.detach(), "b h q k, b k h d -> b q h d"
        )
        return z + (correction - correction.detach())

    hooks: list[tuple[str, HookFn]] = [
        (input_hook, store(input_hook)),
        (f"{prefix}.hook_v", store(f"{prefix}.hook_v")),
        (f"{prefix}.hook_attn_scores", store(f"{prefix}.hook_attn_scores", frozen=True)),
    ]
    for name in adapter.qk_hook_names(layer):
        if name.endswith("hook_scale") or name == "hook_pos_embed":
            hooks.append((name, store(name, frozen=name.endswith("hook_scale"))))
    hooks += [
        (f"{prefix}.hook_pattern", store(f"{prefix}.hook_pattern", frozen=True)),
        (f"{prefix}.hook_z", steer),
    ]
    return hooks


def _mlp_linearising_hooks(
    adapter: ModelAdapter, layer: int, rule: TaylorRule
) -> list[tuple[str, HookFn]]:
    """Linearising hooks for one layer's MLP, or for each expert of a mixture-of-experts layer."""
    prefix = f"blocks.{layer}.mlp"
    if adapter.is_moe:
        hooks: list[tuple[str, HookFn]] = []
        for index, expert in enumerate(adapter.moe(layer).experts):
            name = f"{prefix}.experts.{index}"
            hooks += _activation_hooks(
                f"{name}.hook_gate", f"{name}.hook_pre", f"{name}.hook_post", expert, rule
            )
        return hooks
    mlp = adapter.mlp(layer)
    post = f"{prefix}.hook_mid" if mlp.inner_norm is not None else f"{prefix}.hook_post"
    up = f"{prefix}.hook_pre_linear" if mlp.gated else None
    return _activation_hooks(f"{prefix}.hook_pre", up, post, mlp, rule)


def _activation_hooks(
    gate_hook: str, up_hook: str | None, value_hook: str, mlp: MLPWeights, rule: TaylorRule
) -> list[tuple[str, HookFn]]:
    """Store the live pre-activations, then replace the activation by its linearisation.

    The replacement is ``value.detach() + L(live) - L(live).detach()``: its value is the real one,
    its gradient that of the linear map ``L`` (frozen ratio times each share).
    """
    live: dict[str, Tensor] = {}

    def store(key: str) -> HookFn:
        def fn(value: Tensor, hook) -> None:
            live[key] = value

        return fn

    def linearise(value: Tensor, hook) -> Tensor:
        gate = live["gate"]
        if up_hook is not None:
            up = live["up"]
            g, u = gate.detach(), up.detach()
            act = mlp.act_fn(g)
            r = rule.ratio(NeuronValues(g, act, act * u, u, mlp.act_fn))
            gate_side = r * u * gate
            up_side = act * up
            linear = {"gate": gate_side, "up": up_side, "symmetric": 0.5 * (gate_side + up_side)}[
                rule.side
            ]
        else:
            g = gate.detach()
            values = NeuronValues(g, value.detach(), value.detach(), None, mlp.act_fn)
            linear = rule.ratio(values) * gate
        return value.detach() + (linear - linear.detach())

    hooks: list[tuple[str, HookFn]] = [(gate_hook, store("gate"))]
    if up_hook is not None:
        hooks.append((up_hook, store("up")))
    hooks.append((value_hook, linearise))
    return hooks


def linearised_forward(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    rule: TaylorRule,
    store: Iterable[str],
    stop_at_layer: int | None = None,
    split: AttentionSplit | None = None,
) -> AdjointPass:
    """Run the frozen-linearised model once, keeping the named activations (live and detached).

    The unembedding is never applied (targets read ``unembed.hook_in`` and only their own columns of
    ``W_U``), which saves the ``d_vocab``-wide matmul of a plain forward.
    """
    model = adapter.model
    wanted = set(store)
    live: dict[str, Tensor] = {}

    def leaf(value: Tensor, hook) -> Tensor:
        value = value.detach().requires_grad_(True)
        if hook.name in wanted:
            live[hook.name] = value
        return value

    def keep(value: Tensor, hook) -> None:
        live[hook.name] = value

    fwd_hooks: list[tuple[str | Callable, Callable]] = list(
        linearising_hooks(adapter, rule, split, attention_mask)
    )
    fwd_hooks.append(("hook_embed", leaf))
    if adapter.positional in ("standard", "shortformer"):
        fwd_hooks.append(("hook_pos_embed", leaf))
    # Stored after linearisation hooks so the stored value is what flows on.
    fwd_hooks += [(name, keep) for name in wanted if name not in ("hook_embed", "hook_pos_embed")]
    n_layers = adapter.n_layers if stop_at_layer is None else stop_at_layer
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
        resid = model(
            tokens, attention_mask=attention_mask, stop_at_layer=n_layers, return_type=None
        )
        if stop_at_layer is None and "unembed.hook_in" in wanted:
            has_final_norm = adapter.cfg.normalization_type is not None
            final = model.ln_final(resid) if has_final_norm else resid
            live["unembed.hook_in"] = final
    missing = wanted - set(live)
    if missing:
        raise RuntimeError(f"adjoint pass did not produce {sorted(missing)}")
    return AdjointPass({k: v.detach() for k, v in live.items()}, live)


def target_scalar(
    state: Float[Tensor, "batch pos d_model"],
    weights: Float[Tensor, "batch pos d_model"],
    constant: Float[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``<weights, state> + constant`` per prompt."""
    return (state * weights).sum((-1, -2)) + constant
