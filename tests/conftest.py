"""Random-weight TransformerLens models, one per architecture family DePass must support.

Weights are random *including* biases and norm weights (TransformerLens initialises those to 0 and
1, which would hide bias-handling bugs). Models are tiny so the full matrix runs in seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

BASE = dict(n_layers=3, d_model=32, n_ctx=24, d_head=8, n_heads=4, d_mlp=48, d_vocab=61, seed=0)

#: name -> (config overrides, post-processing); each a family from the issue's coverage list.
FAMILIES: dict[str, tuple[dict, Callable[[HookedTransformer], None] | None]] = {
    "gpt2": (dict(act_fn="gelu_new", normalization_type="LN"), None),
    "folded": (
        dict(act_fn="gelu_new", normalization_type="LN"),
        lambda m: m.process_weights_(
            fold_ln=True, center_writing_weights=True, center_unembed=True
        ),
    ),
    "neox": (
        dict(
            act_fn="gelu",
            normalization_type="LN",
            parallel_attn_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=4,
        ),
        None,
    ),
    "llama": (
        dict(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            n_key_value_heads=2,
            final_rms=True,
        ),
        None,
    ),
    "gemma": (
        dict(
            act_fn="gelu_pytorch_tanh",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            use_normalization_before_and_after=True,
            attn_scores_soft_cap=20.0,
            output_logits_soft_cap=15.0,
            use_qk_norm=True,
            n_key_value_heads=2,
        ),
        None,
    ),
    "attn_only": (dict(attn_only=True, normalization_type="LN", d_mlp=None), None),
    "shortformer": (
        dict(act_fn="relu", normalization_type="LN", positional_embedding_type="shortformer"),
        None,
    ),
    "solu_ln": (dict(act_fn="solu_ln", normalization_type="LN"), None),
    "no_norm": (dict(act_fn="relu", normalization_type=None), None),
    "moe": (
        dict(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            num_experts=4,
            experts_per_token=2,
        ),
        None,
    ),
    "alibi_local": (
        dict(
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="alibi",
            use_local_attn=True,
            attn_types=["global", "local", "global"],
            window_size=4,
        ),
        None,
    ),
}


def randomise(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """Give every bias and norm weight a random non-trivial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            last = name.split(".")[-1].lstrip("_")
            if last in ("w", "b") or last.startswith("b_"):
                base = 1.0 if last == "w" else 0.0
                param.copy_((base + 0.2 * noise).to(param.dtype))
            elif "sinks" in name:
                param.copy_(noise.to(param.dtype))
    return model


def make_model(family: str, dtype: torch.dtype = torch.float32, **overrides) -> HookedTransformer:
    """A tiny random model of ``family`` in ``dtype``."""
    config, post = FAMILIES[family]
    cfg = HookedTransformerConfig(**{**BASE, **config, **overrides, "dtype": dtype})
    model = HookedTransformer(cfg)
    if cfg.num_experts:  # TransformerLens builds MoE experts as default-dtype nn.Linear layers
        torch.nn.Module.to(model, dtype)
    model = randomise(model)
    if post is not None:
        post(model)
    model.eval()
    return model


def random_tokens(model: HookedTransformer, batch: int = 2, n_pos: int = 9, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=gen)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


WORDS = [
    "When",
    "Mary",
    "and",
    "John",
    "went",
    "to",
    "the",
    "store",
    ",",
    "gave",
    "a",
    "drink",
    "bag",
    "Alice",
    "Bob",
    "shop",
    "park",
    "book",
]


def word_tokenizer():
    """A word-level Hugging Face tokenizer built offline (special tokens + ``WORDS``)."""
    from depass_lens.zoo.tokenizer import build_tokenizer

    return build_tokenizer(WORDS, "test")


def make_text_model(family: str = "gpt2", dtype: torch.dtype = torch.float64) -> HookedTransformer:
    """A random model with the word-level tokenizer attached (for string inputs and targets)."""
    tokenizer = word_tokenizer()
    config, _ = FAMILIES[family]
    cfg = HookedTransformerConfig(**{**BASE, **config, "d_vocab": len(tokenizer), "dtype": dtype})
    model = randomise(HookedTransformer(cfg, tokenizer=tokenizer))
    model.eval()
    return model
