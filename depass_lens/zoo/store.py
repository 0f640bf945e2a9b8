"""Saving and loading zoo models: safetensors weights and a JSON of config, vocabulary, results."""

from __future__ import annotations

import json
from typing import Any

from safetensors.torch import load_file, save_file

from depass_lens.adapters.base import TLModel
from depass_lens.adapters.loading import from_tl_weights
from depass_lens.zoo.registry import ZooSpec
from depass_lens.zoo.tokenizer import build_tokenizer


def build_model(spec: ZooSpec, words: list[str], seed: int = 0) -> TLModel:
    """A freshly initialised ``HookedTransformer`` for ``spec`` with its word-level tokenizer
    (training runs under TransformerLens 3.x)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tokenizer = build_tokenizer(words, spec.name)
    cfg = HookedTransformerConfig(
        **spec.config, d_vocab=len(tokenizer), seed=seed, model_name=f"zoo-{spec.name}"
    )
    return HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")


def save(model: TLModel, spec: ZooSpec, words: list[str], meta: dict[str, Any]) -> None:
    """Write the parameters (safetensors) and ``meta`` + vocabulary (JSON) beside each other."""
    spec.weights_path.parent.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}
    save_file(params, str(spec.weights_path))
    spec.meta_path.write_text(json.dumps({**meta, "words": words}, indent=1))


def read_meta(spec: ZooSpec) -> dict[str, Any]:
    if not spec.meta_path.exists():
        raise FileNotFoundError(
            f"zoo model {spec.name!r} has no shipped weights at {spec.meta_path}; train it with "
            f"`python -m depass_lens.zoo.train {spec.name}`"
        )
    return json.loads(spec.meta_path.read_text())


def load_model(spec: ZooSpec, device: str = "cpu") -> TLModel:
    """The shipped model, offline, in eval mode: a ``HookedTransformer`` under TransformerLens
    3.x, a ``TransformerBridge`` with the same weights under 4.x."""
    meta = read_meta(spec)
    tokenizer = build_tokenizer(meta["words"], spec.name)
    state = load_file(str(spec.weights_path), device="cpu")
    config = {**spec.config, "d_vocab": len(tokenizer), "model_name": f"zoo-{spec.name}"}
    try:
        return from_tl_weights(config, state, tokenizer, device=device)
    except RuntimeError as error:
        raise RuntimeError(f"zoo weights for {spec.name!r} do not fit: {error}") from error
