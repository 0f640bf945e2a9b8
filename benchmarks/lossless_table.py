"""Losslessness table: max relative error over every shared hook, per family x split x dtype.

    python -m benchmarks.lossless_table     # uses the test suite's random-weight families

Error = max|sum(components) - real| / max|real| over all hook points the decomposed and real runs
share (now including the split attention scores), and over the (pre-cap) logits. Columns: each MLP
rule with the published (value-side) attention split, then the linear rule with the QK-aware
pattern and symmetric splits.
"""

from __future__ import annotations

import torch

import depass_lens as dp
from depass_lens.decomposition import relative_error
from tests.conftest import FAMILIES, make_model, random_tokens

#: (column name, MLP rule, attention split)
COLUMNS = [(rule, rule, "value") for rule in ("taylor", "softmax", "max", "relu", "linear")] + [
    ("taylor + pattern", "taylor", "pattern"),
    ("taylor + symmetric", "taylor", "symmetric"),
]


def main() -> None:
    print("| family | dtype | hooks | " + " | ".join(name for name, _, _ in COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for family in sorted(FAMILIES):
        for dtype in (torch.float32, torch.float64):
            model = make_model(family, dtype)
            tokens = random_tokens(model)
            _, cache = model.run_with_cache(tokens)
            depass = dp.DePass(model)
            cells, n_hooks = [], 0
            for _, rule, split in COLUMNS:
                res = depass.run(
                    tokens, cache=cache, rule=rule, attention=split, names_filter=lambda n: True
                )
                errors = res.check_lossless(cache)
                errors["logits"] = relative_error(res.logits(), cache["unembed.hook_out"])
                n_hooks = max(n_hooks, len(errors))
                cells.append(f"{max(errors.values()):.1e}")
            name = str(dtype).replace("torch.", "")
            print(f"| {family} | {name} | {n_hooks} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
