"""Tiny random Hugging Face checkpoints, written offline, for the models users really load.

Each family is a random-initialised HF config (GPT-2, GPT-NeoX with partial rotary and parallel
blocks, LLaMA with grouped-query attention, Qwen2 with its Q/K/V biases, Gemma with its offset
RMSNorm and scaled embeddings). Biases and norm weights are randomised too (HF initialises them
to 0 and 1, which would hide bias-handling bugs). The checkpoint and a word-level tokenizer are
saved to a folder, so TransformerLens 4 loads it with ``TransformerBridge.boot_transformers`` and
TransformerLens 3 through its own weight-conversion functions, exactly as for a downloaded model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_FAMILIES = ("gpt2", "neox", "llama", "qwen2", "gemma")
SIZES = dict(layers=2, d_model=32, heads=4, kv_heads=2, d_mlp=48, n_ctx=24)


def hf_config(family: str, vocab: int) -> Any:
    """The random model's HF config (two layers, ``d_model`` 32, four heads)."""
    import transformers

    s = SIZES
    llama_like = dict(
        num_hidden_layers=s["layers"],
        hidden_size=s["d_model"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        intermediate_size=s["d_mlp"],
        max_position_embeddings=s["n_ctx"],
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=s["layers"],
            n_embd=s["d_model"],
            n_head=s["heads"],
            n_inner=None,  # 4 * d_model: TransformerLens 3's GPT-2 conversion assumes it
            n_positions=s["n_ctx"],
            n_ctx=s["n_ctx"],  # TransformerLens 3's GPT-2 config conversion still reads n_ctx
            vocab_size=vocab,
        )
    if family == "neox":
        return transformers.GPTNeoXConfig(
            num_hidden_layers=s["layers"],
            hidden_size=s["d_model"],
            num_attention_heads=s["heads"],
            intermediate_size=s["d_mlp"],
            max_position_embeddings=s["n_ctx"],
            vocab_size=vocab,
            rotary_pct=0.5,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
    if family == "llama":
        return transformers.LlamaConfig(**llama_like)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if family == "gemma":
        return transformers.GemmaConfig(
            **{**llama_like, "head_dim": 8, "tie_word_embeddings": True}
        )
    raise KeyError(family)


def randomise_hf(model: torch.nn.Module, seed: int) -> None:
    """Random non-trivial biases and norm weights (HF initialises them to 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
            if name.endswith("bias"):
                param.copy_((0.2 * noise).to(param.dtype))
            elif is_norm and param.ndim == 1:
                base = 0.0 if "Gemma" in type(model).__name__ else 1.0  # Gemma: offset from 1
                param.copy_((base + 0.2 * noise).to(param.dtype))


def hf_model(family: str, seed: int = 0) -> Any:
    """The random HF model of ``family`` (eval mode, float32), built offline."""
    import transformers

    from tests.conftest import word_tokenizer

    config = hf_config(family, len(word_tokenizer()))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomise_hf(model, seed + 1)
    return model.eval()


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a saved HF state dict into ``model`` (tied weights included)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise RuntimeError(f"checkpoint does not fit: missing {missing}, unexpected {unexpected}")


def write_checkpoint(
    family: str,
    folder: Path,
    state: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Path:
    """Write the ``family`` checkpoint (``state``, else a fresh random one) and the tokenizer
    to ``folder/<name>``; returns that directory. The name avoids "llama"/"gemma", which
    TransformerLens 3 treats as official model names rather than local paths."""
    from tests.conftest import word_tokenizer

    model = hf_model(family, seed)
    if state is not None:
        load_state(model, state)
    path = Path(folder) / f"ckpt_{HF_FAMILIES.index(family)}"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def _gemma_tl3_config(hf: Any) -> dict[str, Any]:
    """TransformerLens 3's Gemma config for ``hf`` (TL 3 derives Gemma configs from official
    names only, so this mirrors its ``google/gemma-2b`` entry with the random model's sizes; the
    activation is the one HF's Gemma MLP really uses)."""
    c = hf.config
    return {
        "d_model": c.hidden_size,
        "d_head": c.head_dim,
        "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "n_ctx": c.max_position_embeddings,
        "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size,
        "act_fn": getattr(c, "hidden_activation", None) or c.hidden_act,
        "normalization_type": "RMS",
        "rotary_base": 10000,
        "rotary_dim": c.head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": c.num_key_value_heads,
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": "GemmaForCausalLM",
        "model_name": "random-gemma",
        "init_weights": False,
    }


def tl3_model(family: str, path: Path, dtype: torch.dtype, process: bool) -> Any:
    """The checkpoint at ``path`` as TransformerLens 3 loads a pretrained model: its config
    conversion (``get_pretrained_model_config``), its weight conversion
    (``get_pretrained_state_dict`` with ``hf_model=``, i.e. ``convert_<family>_weights``) and
    ``load_and_process_state_dict`` with or without weight processing (folded norms, centred
    writing weights and unembedding, folded value biases) -- what ``from_pretrained`` does."""
    import transformers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    from tests.conftest import word_tokenizer

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if family == "gemma":
        cfg = HookedTransformerConfig(**{**_gemma_tl3_config(hf), "dtype": dtype})
    else:
        cfg = loading.get_pretrained_model_config(
            str(path), hf_cfg=hf.config.to_dict(), fold_ln=process, dtype=dtype
        )
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer=word_tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=process,
        center_writing_weights=process,
        center_unembed=process,
        fold_value_biases=process,
    )
    return model.eval()


__all__ = ["HF_FAMILIES", "hf_config", "hf_model", "load_state", "tl3_model", "write_checkpoint"]
