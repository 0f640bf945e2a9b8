"""SAEs shipped with the zoo models, in SAELens's on-disk format (``cfg.json`` +
``sae_weights.safetensors``), loaded offline.

>>> from depass_lens import zoo
>>> sae = zoo.load_sae("ioi")                        # a dependency-free SimpleSAE
>>> sae = zoo.load_sae("ioi", as_saelens=True)       # the same SAE as a SAELens SAE object
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from depass_lens.sae.simple import SimpleSAE, load_sae_dir
from depass_lens.zoo.registry import ZOO_DIR

SAE_DIR = ZOO_DIR / "saes"

#: (model, short hook name) -> directory name under zoo/saes/; the first per model is its default
SHIPPED: dict[tuple[str, str], str] = {("ioi", "L1.resid_post"): "ioi-L1-resid_post"}


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


__all__ = ["SHIPPED", "SimpleSAE", "load_sae", "sae_card", "sae_path", "sae_stats"]
