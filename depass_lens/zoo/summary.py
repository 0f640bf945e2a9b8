"""Markdown summary of the shipped zoo models (for the docs and the README).

python -m depass_lens.zoo.summary
"""

from __future__ import annotations

from depass_lens import zoo
from depass_lens.zoo.ablation import circuit_heads, top_components


def table() -> str:
    lines = [
        "| model | architecture | held-out top-1 | answer > wrong | train time | weights | "
        "heads that matter (mean-ablation > 10%) | top-5 heads by ablation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in zoo.list():
        info = zoo.info(name)
        truth = zoo.ground_truth(name)
        acc = info["accuracy"]
        circuit = circuit_heads(truth)
        top = ", ".join(f"{n} ({v:+.2f})" for n, v in top_components(truth, "heads_mean"))
        lines.append(
            f"| `{name}` | {zoo.spec(name).description} | {acc['top1']:.3f} | "
            f"{acc.get('beats_wrong', float('nan')):.3f} | {info['train_seconds']:.0f} s | "
            f"{info['weights_bytes'] / 1e6:.2f} MB | {len(circuit)} | {top} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table())
