"""Attribution methods with one signature per level, so protocols can compare them like with like.

Token level: ``fn(model, batch) -> Float[Tensor, "batch pos"]`` (a score per input token).
Component level: ``fn(model, batch, level) -> Float[Tensor, "batch comp"]`` with ``level`` one of
``"heads"`` (``n_layers * n_heads``, layer-major) or ``"neurons"`` (``n_layers * d_mlp``).

Every component score is an *importance*: large means "this component pushes the target up".
For ablation and patching that is minus the change when the component is removed; for DePass it is
the component's share of the target. ``depass-relative`` subtracts each component's share on the
corrupted prompt, turning a share into a change like the others.
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

import depass_lens as dp
from depass_lens.evaluation.metrics import TaskBatch

TokenMethod = Callable[[HookedTransformer, TaskBatch], Float[Tensor, "batch pos"]]
ComponentMethod = Callable[[HookedTransformer, TaskBatch, str], Float[Tensor, "batch comp"]]

RULES = ("taylor", "softmax", "max", "relu", "linear")


def _hook_of(level: str) -> str:
    if level == "heads":
        return "attn.hook_z"
    if level == "neurons":
        return "mlp.hook_post"
    raise ValueError(f"level must be 'heads' or 'neurons', not {level!r}")


def _stack(acts: dict[str, Tensor], model: HookedTransformer, level: str) -> Tensor:
    """Per-layer activations as ``batch pos comp width`` (head: its z; neuron: width 1)."""
    suffix = _hook_of(level)
    parts = [acts[f"blocks.{layer}.{suffix}"] for layer in range(model.cfg.n_layers)]
    if level == "heads":  # batch pos head d_head
        return torch.cat(parts, dim=2)
    return torch.cat(parts, dim=2).unsqueeze(-1)  # batch pos neuron 1


# ---------------------------------------------------------------------------------- tokens
def _embedding_grad(
    model: HookedTransformer, batch: TaskBatch, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Gradient of the metric w.r.t. the (scaled) residual input, and that input.

    The input is the token embedding plus, for learned absolute positions, the positional one
    (both scaled, so ``scale=0`` is the all-zero input integrated gradients starts from).
    """
    store: dict[str, Tensor] = {}

    def grab(value: Tensor, hook) -> Tensor:
        value = (value.detach() * scale).requires_grad_(True)
        store[hook.name] = value
        return value

    additive = model.cfg.positional_embedding_type == "standard"
    names = ["hook_embed"] + (["hook_pos_embed"] if additive else [])
    with torch.enable_grad():
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(n, grab) for n in names])
        (grad,) = torch.autograd.grad(batch.metric(logits).sum(), [store["hook_embed"]])
    embed = sum(store[n].detach() for n in names)
    return grad, embed  # type: ignore[return-value]


def gradient_norm(model, batch):
    grad, _ = _embedding_grad(model, batch)
    return grad.norm(dim=-1)


def gradient_x_input(model, batch):
    grad, embed = _embedding_grad(model, batch)
    return (grad * embed).sum(-1)


def integrated_gradients(model, batch, steps: int = 32):
    """Riemann (midpoint) integral from the zero embedding to the real one."""
    total: Tensor | float = 0.0
    embed = None
    for i in range(steps):
        grad, scaled = _embedding_grad(model, batch, scale=(i + 0.5) / steps)
        total = total + grad
        embed = scaled / ((i + 0.5) / steps)
    assert embed is not None
    return (embed * total / steps).sum(-1)


@torch.no_grad()
def attention_last_layer(model, batch):
    name = f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"
    _, cache = model.run_with_cache(batch.tokens, names_filter=name)
    return cache[name][:, :, -1].mean(1)


@torch.no_grad()
def attention_rollout(model, batch):
    """Abnar & Zuidema's rollout: product of (head-mean pattern + identity) / 2 over layers."""
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    n_pos = batch.tokens.shape[1]
    eye = torch.eye(n_pos, device=batch.tokens.device)
    rollout = eye.expand(len(batch), n_pos, n_pos)
    for layer in range(model.cfg.n_layers):
        mixed = 0.5 * cache[f"blocks.{layer}.attn.hook_pattern"].mean(1) + 0.5 * eye
        rollout = mixed @ rollout
    return rollout[:, -1]


def random_tokens(model, batch, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch.tokens.shape, generator=gen)


def depass_tokens(rule: str) -> TokenMethod:
    def method(model, batch):
        attribution = dp.DePass(model, rule=rule, progress=False).attribute(
            batch.tokens, batch.target(), dp.Tokens()
        )
        return attribution.tokens()[:, 0]

    method.__name__ = f"depass_{rule}"
    return method


# ---------------------------------------------------------------------------------- components
def _acts_and_grads(
    model: HookedTransformer, tokens: Tensor, batch: TaskBatch, level: str, grads: bool
) -> tuple[Tensor, Tensor | None]:
    suffix = _hook_of(level)
    store: dict[str, Tensor] = {}

    def keep(value: Tensor, hook) -> None:
        if grads:
            value.retain_grad()
        store[hook.name] = value

    hooks: list[tuple[str | Callable, Callable]] = [
        (f"blocks.{L}.{suffix}", keep) for L in range(model.cfg.n_layers)
    ]
    with torch.set_grad_enabled(grads):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        if grads:
            names = list(store)
            g = torch.autograd.grad(batch.metric(logits).sum(), [store[n] for n in names])
            grad_dict = dict(zip(names, g, strict=True))
            return (
                _stack({k: v.detach() for k, v in store.items()}, model, level),
                _stack(grad_dict, model, level),
            )
    return _stack(store, model, level), None


def attribution_patching(model, batch, level):
    """AtP: ``(a_clean - a_corrupt) . grad_clean`` summed over positions (Nanda et al.)."""
    if batch.corrupted is None:
        raise ValueError("attribution patching needs corrupted prompts")
    clean, grad = _acts_and_grads(model, batch.tokens, batch, level, grads=True)
    corrupt, _ = _acts_and_grads(model, batch.corrupted, batch, level, grads=False)
    assert grad is not None
    return einops.reduce((clean - corrupt) * grad, "b p c w -> b c", "sum")


def gradient_x_activation(model, batch, level):
    acts, grad = _acts_and_grads(model, batch.tokens, batch, level, grads=True)
    assert grad is not None
    return einops.reduce(acts * grad, "b p c w -> b c", "sum")


def activation_norm(model, batch, level):
    acts, _ = _acts_and_grads(model, batch.tokens, batch, level, grads=False)
    return acts[:, -1].norm(dim=-1)


def random_components(model, batch, level, seed: int = 0):
    acts, _ = _acts_and_grads(model, batch.tokens[:1], batch, level, grads=False)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(batch), acts.shape[2], generator=gen)


@torch.no_grad()
def exact_ablation(model, batch, level, kind: str = "mean"):
    """Minus the change of the metric when one component is ablated: n_comp forward passes."""
    reference = batch.reference if batch.reference is not None else batch.tokens
    suffix = _hook_of(level)
    _, cache = model.run_with_cache(reference, names_filter=lambda n: n.endswith(suffix))
    clean = batch.metric(model(batch.tokens))
    width = model.cfg.n_heads if level == "heads" else (model.cfg.d_mlp or 0)
    scores = []
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.{suffix}"
        mean = cache[name].mean((0, 1))
        for index in range(width):

            def hook(value, hook, index=index, mean=mean):
                value = value.clone()
                value[:, :, index] = 0 if kind == "zero" else mean[index]
                return value

            ablated = batch.metric(model.run_with_hooks(batch.tokens, fwd_hooks=[(name, hook)]))
            scores.append(clean - ablated)
    return torch.stack(scores, dim=1)


def depass_components(rule: str, relative: bool = False) -> ComponentMethod:
    """DePass head or neuron shares (``relative``: minus the share on the corrupted prompt)."""

    def method(model, batch, level):
        source = dp.Heads() if level == "heads" else dp.Neurons()
        depass = dp.DePass(model, rule=rule, progress=False)

        def shares(tokens: Tensor) -> Tensor:
            attribution = depass.attribute(tokens, batch.target(), source)
            kind = "head" if level == "heads" else "neuron"
            return attribution.of_kind(kind)[:, 0]

        scores = shares(batch.tokens)
        if relative:
            if batch.corrupted is None:
                raise ValueError("baseline-relative DePass needs corrupted prompts")
            scores = scores - shares(batch.corrupted)
        return scores

    method.__name__ = f"depass_{rule}{'_relative' if relative else ''}"
    return method


def depass_tokens_magnitude(model, batch):
    """DePass (taylor) token shares ranked by magnitude: tokens that matter either way."""
    return depass_tokens("taylor")(model, batch).abs()


TOKEN_METHODS: dict[str, TokenMethod] = {
    **{f"depass-{rule}": depass_tokens(rule) for rule in RULES},
    "depass-taylor-abs": depass_tokens_magnitude,
    "attention": attention_last_layer,
    "attention-rollout": attention_rollout,
    "gradient-norm": gradient_norm,
    "grad-x-input": gradient_x_input,
    "integrated-gradients": integrated_gradients,
    "random": random_tokens,
}

COMPONENT_METHODS: dict[str, ComponentMethod] = {
    **{f"depass-{rule}": depass_components(rule) for rule in RULES},
    "depass-taylor-relative": depass_components("taylor", relative=True),
    "attribution-patching": attribution_patching,
    "grad-x-activation": gradient_x_activation,
    "activation-norm": activation_norm,
    "random": random_components,
    "ablation-mean": exact_ablation,
}


def register_token_method(name: str, fn: TokenMethod) -> None:
    TOKEN_METHODS[name] = fn


def register_component_method(name: str, fn: ComponentMethod) -> None:
    COMPONENT_METHODS[name] = fn
