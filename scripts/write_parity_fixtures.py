"""Write the cross-version parity fixtures (run under TransformerLens 3.x, from the repo root):

    .venv/bin/python scripts/write_parity_fixtures.py

For each HF family of tests/hf_checkpoints.py: the random checkpoint's weights (float32) and the
DePass scores of tests/parity_cases.py on TransformerLens 3's conversion of it (unprocessed), in
float32 and float64. For each zoo model in ``ZOO``: the scores of the shipped model. One
safetensors file per model under tests/fixtures/parity/; tests/test_parity.py checks them
under TransformerLens 4.x.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depass_lens.adapters.loading import tl_generation  # noqa: E402
from tests.hf_checkpoints import HF_FAMILIES, hf_model, tl3_model, write_checkpoint  # noqa: E402
from tests.parity_cases import DTYPES, FIXTURES, ZOO, parity_scores, parity_tokens  # noqa: E402


def main() -> None:
    if tl_generation() >= 4:
        raise SystemExit("write the fixtures under TransformerLens 3.x (the reference side)")
    from depass_lens import zoo

    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for family in HF_FAMILIES:
            hf = hf_model(family)
            tensors = {f"weight.{k}": v.detach().clone() for k, v in hf.state_dict().items()}
            path = write_checkpoint(family, Path(folder))
            tokens = parity_tokens(hf.config.vocab_size)
            tensors["tokens"] = tokens
            for dtype, tag in DTYPES.items():
                model = tl3_model(family, path, dtype, process=False)
                for name, scores in parity_scores(model, tokens).items():
                    tensors[f"score.{tag}.{name}"] = scores
            save_file(_unshared(tensors), str(FIXTURES / f"{family}.safetensors"))
            print("wrote", family)
    for name, dtypes in ZOO.items():
        model = zoo.load(name)
        tokens = zoo.task(name).batch(model, 4).tokens
        tensors = {"tokens": tokens}
        for dtype in dtypes:
            model = model.to(dtype)
            for case, scores in parity_scores(model, tokens).items():
                tensors[f"score.{DTYPES[dtype]}.{case}"] = scores
        save_file(tensors, str(FIXTURES / f"zoo-{name}.safetensors"))
        print("wrote zoo", name)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one copy of each."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in tensors.items():
        pointer = value.data_ptr()
        if pointer in seen and key.startswith("weight."):
            continue
        seen[pointer] = key
        out[key] = value.contiguous()
    return out


if __name__ == "__main__":
    main()
