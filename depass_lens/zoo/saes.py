"""SAEs and transcoders shipped with the zoo models, in SAELens's on-disk format (``cfg.json`` +
``sae_weights.safetensors``), loaded offline.

>>> from depass_lens import zoo
>>> sae = zoo.load_sae("ioi")                        # a dependency-free SimpleSAE
>>> sae = zoo.load_sae("ioi", as_saelens=True)       # the same SAE as a SAELens SAE object
>>> from depass_lens.zoo.saes import load_dictionaries, top_examples
>>> load_dictionaries("ioi")                         # the MLPs' transcoders, layer by layer
>>> top_examples("ioi", "L1.transcoder")[17]         # (prompt, position, token, activation)

Besides the residual SAE, each model ships the sparse dictionaries that form its replacement
model (trained by :mod:`depass_lens.zoo.dictionary_train`): a TopK transcoder per MLP
(``ln2.hook_normalized`` -> ``hook_mlp_out``) for ``ioi`` and ``recall``, a TopK SAE on every
layer's ``attn.hook_z`` (heads flattened) for the attention-only ``induction`` and ``binding``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from depass_lens.sae.simple import SimpleSAE, load_sae_dir
from depass_lens.zoo.registry import ZOO_DIR

SAE_DIR = ZOO_DIR / "saes"

#: (model, short hook name) -> directory name under zoo/saes/; the first per model is its default.
#: Short names ``L<layer>.transcoder`` and ``L<layer>.z`` are the replacement dictionaries.
SHIPPED: dict[tuple[str, str], str] = {("ioi", "L1.resid_post"): "ioi-L1-resid_post"}
#: The kinds of dictionary that replace a layer's module (the short name's suffix)
DICTIONARY_KINDS = ("transcoder", "z")
#: (model, kind, layers) of the shipped dictionaries, in directories ``<model>-L<layer>-<kind>``
DICTIONARIES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("ioi", "transcoder", (0, 1, 2)),
    ("recall", "transcoder", (0, 1)),
    ("induction", "z", (0, 1)),
    ("binding", "z", (0, 1, 2)),
)
SHIPPED.update(
    {
        (model, f"L{layer}.{kind}"): f"{model}-L{layer}-{kind}"
        for model, kind, layers in DICTIONARIES
        for layer in layers
    }
)


def sae_path(model: str, hook: str | None = None) -> Path:
    """The directory of a shipped SAE (``hook`` like ``"L1.resid_post"``; default: the first)."""
    options = [(m, h) for (m, h) in SHIPPED if m == model and (hook is None or h == hook)]
    if not options:
        have = sorted(f"{m}:{h}" for m, h in SHIPPED)
        raise KeyError(f"no shipped SAE for model {model!r}, hook {hook!r}; shipped: {have}")
    return SAE_DIR / SHIPPED[options[0]]


def load_sae(
    model: str, hook: str | None = None, *, as_saelens: bool = False, device: str = "cpu"
) -> Any:
    """A shipped SAE: a :class:`~depass_lens.sae.SimpleSAE`, or with ``as_saelens`` SAELens's
    own ``SAE`` loaded from the same files (needs ``pip install 'depass-lens[sae]'``)."""
    path = sae_path(model, hook)
    if not as_saelens:
        return load_sae_dir(path, device)
    try:
        from sae_lens import SAE  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError("as_saelens=True needs SAELens: pip install 'depass-lens[sae]'") from exc
    return SAE.load_from_disk(str(path), device=device)


def sae_stats(model: str, hook: str | None = None) -> dict[str, Any]:
    """Training metadata and held-out measurements (L0, explained variance, ...)."""
    return json.loads((sae_path(model, hook) / "stats.json").read_text())


def sae_card(model: str) -> str:
    """The SAE card (markdown)."""
    return (ZOO_DIR / "cards" / f"{model}.sae.md").read_text()


def dictionary_keys(model: str) -> list[str]:
    """The short names (``"L0.transcoder"``, ``"L1.z"``, ...) of the shipped dictionaries that
    form ``model``'s replacement, in layer order."""
    keys = [h for (m, h) in SHIPPED if m == model and h.split(".")[-1] in DICTIONARY_KINDS]
    return sorted(keys, key=lambda h: int(h.split(".")[0].removeprefix("L")))


def load_dictionaries(model: str, device: str = "cpu") -> list[SimpleSAE]:
    """All shipped dictionaries of ``model`` that form its replacement model (its MLPs'
    transcoders or its attention layers' ``hook_z`` SAEs), in layer order."""
    keys = dictionary_keys(model)
    if not keys:
        have = sorted({m for m, h in SHIPPED if h.split(".")[-1] in DICTIONARY_KINDS})
        raise KeyError(f"no shipped dictionaries for model {model!r}; shipped for: {have}")
    return [load_sae_dir(sae_path(model, key), device) for key in keys]


def dictionary_stats(model: str) -> dict[str, dict[str, Any]]:
    """``stats.json`` of each of :func:`load_dictionaries`, keyed by short name, in layer order."""
    return {key: sae_stats(model, key) for key in dictionary_keys(model)}


def dictionary_card(model: str) -> str:
    """The dictionaries' card (markdown)."""
    return (ZOO_DIR / "cards" / f"{model}.dictionaries.md").read_text()


def top_examples(model: str, hook: str) -> dict[int, list[tuple[str, int, str, float]]]:
    """Per latent that fires on the held-out prompts, its top-activating examples (one per
    prompt, at most 5) as ``(prompt text, position, token, activation)``; ``position`` counts
    BOS as 0. Stored compactly in ``stats.json`` (a prompt table and indices into it)."""
    table = sae_stats(model, hook).get("top_examples")
    if table is None:
        raise KeyError(f"{model}:{hook} has no top_examples in its stats.json")
    prompts = table["prompts"]
    return {
        int(latent): [(prompts[p], pos, tok, act) for p, pos, tok, act in rows]
        for latent, rows in table["latents"].items()
    }


__all__ = [
    "DICTIONARY_KINDS",
    "SHIPPED",
    "SimpleSAE",
    "dictionary_card",
    "dictionary_keys",
    "dictionary_stats",
    "load_dictionaries",
    "load_sae",
    "sae_card",
    "sae_path",
    "sae_stats",
    "top_examples",
]
