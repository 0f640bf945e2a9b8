"""Random-weight TransformerLens models, one per architecture family DePass must support.

Weights are random *including* biases and norm weights (TransformerLens initialises those to 0 and
1, which would hide bias-handling bugs). Models are tiny so the full matrix runs in seconds.

The suite runs under either TransformerLens generation. Under 3.x a family is a
``HookedTransformer``; under 4.x the same config is a ``TransformerBridge.boot_native`` model in
compatibility mode, and families the native model cannot express (parallel blocks, post-norms,
MoE, ALiBi, ...) skip here, saying so (tests/test_bridge_hf.py covers NeoX and Gemma through
Hugging Face checkpoints instead).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from depass_lens.adapters import repair_native_scores
from depass_lens.adapters.loading import tl_generation

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: The installed TransformerLens generation (3 or 4).
TL = tl_generation()
TL3_ONLY = "needs TransformerLens 3.x (HookedTransformer); this environment has TransformerLens 4"
TL4_ONLY = "needs TransformerLens 4.x (TransformerBridge); this environment has TransformerLens 3"
requires_tl3 = pytest.mark.skipif(TL >= 4, reason=TL3_ONLY)
requires_tl4 = pytest.mark.skipif(TL < 4, reason=TL4_ONLY)
HookedTransformer: Any = None
if TL < 4:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

BASE = dict(n_layers=3, d_model=32, n_ctx=24, d_head=8, n_heads=4, d_mlp=48, d_vocab=61, seed=0)

#: name -> (config overrides, post-processing); each a family from the issue's coverage list.
FAMILIES: dict[str, tuple[dict, Callable[[Any], None] | None]] = {
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


#: Families ``boot_native`` cannot build, with what it lacks (TransformerLens 4 only).
NATIVE_LACKS = {
    "gemma": "post-norms and QK norm",
    "shortformer": "shortformer positions",
    "moe": "mixture of experts",
    "alibi_local": "ALiBi and local attention",
}
#: Families the Bridge adapter refuses (the test of the refusal is in tests/test_bridge.py).
BRIDGE_REFUSES = {"solu_ln": "SoLU-LN MLPs (the bridge exposes no mlp.hook_mid)"}


def randomise(model: Any, seed: int = 0) -> Any:
    """Give every bias and norm weight a random non-trivial value."""
    gen = torch.Generator().manual_seed(seed)
    if TL >= 4:
        return _randomise_native(model, gen)
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


def _randomise_native(model: Any, gen: torch.Generator) -> Any:
    """:func:`randomise` for a ``boot_native`` bridge: biases and norm weights of its module."""
    with torch.no_grad():
        for name, param in model.original_model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if name.endswith("bias"):
                param.copy_((0.2 * noise).to(param.dtype))
            elif name.startswith(("ln", "layers")) and ".ln" in f".{name}" and param.ndim == 1:
                param.copy_((1.0 + 0.2 * noise).to(param.dtype))
    return model


def native_bridge(
    config: dict, dtype: torch.dtype, tokenizer: Any = None, process: bool = False
) -> Any:
    """A random ``boot_native`` bridge with TransformerLens 3 style ``config`` (biases and norm
    weights randomised), in compatibility mode; ``process`` folds and centres like TL 3's
    ``process_weights_``.

    In float64 its RMS norms take the bridge's own float64 path: by default they run the wrapped
    RMSNorm, which computes in float32 whatever the dtype (as HF's does), and the float64 engine
    checks need a model that is float64 throughout. The default, float32-bound path is checked
    in tests/test_bridge.py at the precision the adapter reports.
    """
    import transformer_lens.model_bridge.sources.native  # noqa: F401 - attaches boot_native
    from transformer_lens.model_bridge import TransformerBridge

    fields = {k: v for k, v in config.items() if k != "dtype"}
    bridge = randomise(TransformerBridge.boot_native(fields, tokenizer=tokenizer, dtype=dtype))
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process)
    repair_native_scores(bridge)  # real scores at hook_attn_scores (see adapters/native_scores)
    if dtype == torch.float64:
        for module in bridge.modules():
            if getattr(module, "uses_rms_norm", False) and hasattr(module, "hook_scale"):
                module.use_native_layernorm_autograd = False
    bridge.eval()
    return bridge


#: Families ``boot_native`` cannot build that real Hugging Face code can: under TransformerLens 4
#: they are a random HF checkpoint of the family's shape, written offline and booted with
#: ``boot_transformers`` (see :func:`hf_family_bridge`).
HF_BUILT = {"neox"}
_HF_FOLDER: dict[str, Any] = {}


def hf_family_bridge(family: str, dtype: torch.dtype, overrides: dict) -> Any:
    """``family`` (TL 3 config in :data:`FAMILIES`) as a random HF checkpoint booted into a
    TransformerBridge: GPT-NeoX with ``BASE``'s sizes, rotary on half of each head (``rotary_dim``
    4 of ``d_head`` 8) and parallel attention + MLP. Written once per session to a temporary
    folder; biases and norm weights randomised like every test model's."""
    import tempfile
    from pathlib import Path

    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from tests.hf_checkpoints import randomise_hf

    sizes = {**BASE, **FAMILIES[family][0], **overrides}
    key = repr(sorted(sizes.items()))
    if key not in _HF_FOLDER:
        assert family == "neox", family
        tokenizer = word_tokenizer()
        config = transformers.GPTNeoXConfig(
            num_hidden_layers=sizes["n_layers"],
            hidden_size=sizes["d_model"],
            num_attention_heads=sizes["n_heads"],
            intermediate_size=sizes["d_mlp"],
            max_position_embeddings=sizes["n_ctx"],
            vocab_size=len(tokenizer),
            rotary_pct=sizes["rotary_dim"] / sizes["d_head"],
            use_parallel_residual=sizes["parallel_attn_mlp"],
            hidden_act=sizes["act_fn"],
            tie_word_embeddings=False,
        )
        torch.manual_seed(sizes["seed"])
        model = transformers.AutoModelForCausalLM.from_config(config)
        randomise_hf(model, sizes["seed"] + 1)
        path = Path(tempfile.mkdtemp(prefix=f"depass_{family}_"))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        _HF_FOLDER[key] = path
    bridge = TransformerBridge.boot_transformers(str(_HF_FOLDER[key]), device="cpu", dtype=dtype)
    return bridge.eval()


def _make_bridge(family: str, dtype: torch.dtype, overrides: dict) -> Any:
    if family in HF_BUILT:
        return hf_family_bridge(family, dtype, overrides)
    lacks = {**NATIVE_LACKS, **BRIDGE_REFUSES}
    if family in lacks:
        pytest.skip(f"TransformerLens 4: no Bridge for {family} ({lacks[family]})")
    config, _ = FAMILIES[family]
    return native_bridge({**BASE, **config, **overrides}, dtype, process=family == "folded")


def make_model(family: str, dtype: torch.dtype = torch.float32, **overrides) -> Any:
    """A tiny random model of ``family`` in ``dtype`` (a Bridge under TransformerLens 4)."""
    if TL >= 4:
        return _make_bridge(family, dtype, overrides)
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


#: Families whose circuit graphs need TransformerLens 3, and why (under TransformerLens 4).
BRIDGE_NO_GRAPHS = {
    "llama": "grouped-query attention: a bridge computes one key/value per group, a graph "
    "needs one per query head (the refusal is tested in tests/test_bridge.py)",
}


def graph_model(family: str, dtype: torch.dtype = torch.float32, **overrides) -> Any:
    """:func:`make_model` for tests that build circuit graphs (skips what a bridge refuses)."""
    if TL >= 4 and family in BRIDGE_NO_GRAPHS:
        pytest.skip(f"TransformerLens 4: no graph for {family} ({BRIDGE_NO_GRAPHS[family]})")
    return make_model(family, dtype, **overrides)


def random_tokens(model: Any, batch: int = 2, n_pos: int = 9, seed: int = 1):
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


def make_text_model(family: str = "gpt2", dtype: torch.dtype = torch.float64) -> Any:
    """A random model with the word-level tokenizer attached (for string inputs and targets)."""
    tokenizer = word_tokenizer()
    config, _ = FAMILIES[family]
    if TL >= 4:
        if family in NATIVE_LACKS:
            pytest.skip(f"TransformerLens 4's boot_native has no {NATIVE_LACKS[family]}")
        return native_bridge({**BASE, **config, "d_vocab": len(tokenizer)}, dtype, tokenizer)
    cfg = HookedTransformerConfig(**{**BASE, **config, "d_vocab": len(tokenizer), "dtype": dtype})
    model = randomise(HookedTransformer(cfg, tokenizer=tokenizer))
    model.eval()
    return model


#: Two paths computing one linear map in different association orders (adjoint vs forward
#: mode, a naive reimplementation vs the engine) differ by rounding accumulated over the
#: layers: a few eps per layer of the largest score's size, for fp32 measured up to 9 eps
#: (1.03e-6, moe) on 3 layers. The bound is the dtype's losslessness tolerance (fp32
#: 1e-5 = 84 eps, fp64 1e-10), which no real disagreement stays under.
AGREEMENT = {torch.float32: 1e-5, torch.float64: 1e-10}


#: Under TransformerLens 4, whole test modules that need what only a HookedTransformer has, and why.
TL3_MODULES: dict[str, str] = {}
#: Single tests that need TransformerLens 3, and why.
_NEOX_NO_ROTARY_HOOK = (
    "the difference linearisation needs the final (post-rotary) queries and keys; a bridge's "
    "Hugging Face GPT-NeoX attention fires no hook after its rotary embedding (refused by name)"
)
TL3_TESTS = {
    "test_difference_graph_is_exact_every_family[neox-fp32]": _NEOX_NO_ROTARY_HOOK,
    "test_difference_graph_is_exact_every_family[neox-fp64]": _NEOX_NO_ROTARY_HOOK,
    "test_training_reduces_the_loss": "zoo training builds HookedTransformers",
    "test_mechanism_edges_hold_by_path_patching[recall]": (
        "recall's edges were measured by patching a grouped key/value head's own input; a "
        "bridge's grouped-query attention has no per-head input (per-node inputs are refused)"
    ),
    "test_reference_parity_conventions[max]": (
        "checks that a head wins some layer-1 neuron at position 0 under max, a property of "
        "TL 3's random weights; on the native model's weights the rest wins every one"
    ),
    "test_dropping_one_constant_breaks_completeness[llama-value-hook_post.remainder]": (
        "the native gated MLP has no b_in, so there is no remainder constant to drop"
    ),
}


def pytest_collection_modifyitems(config, items):
    """Skip, under TransformerLens 4, what needs a HookedTransformer (with the reason)."""
    if TL < 4:
        return
    for item in items:
        module = item.path.name
        reason = (
            TL3_MODULES.get(module) or TL3_TESTS.get(item.name) or TL3_TESTS.get(item.originalname)
        )
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"TransformerLens 4: {reason}"))
