"""The demo behind ``depass-lens demo``: one prompt, every level of DePass, one HTML report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import depass_lens as dp
from depass_lens import plot
from depass_lens.adapters.base import TLModel
from depass_lens.errors import UnsupportedModelError
from depass_lens.report import Report
from depass_lens.targets import Target


@dataclass
class DemoResult:
    """What the demo computed, for the printed summary and for tests."""

    path: Path
    target: str
    target_value: float
    top_tokens: list[tuple[str, float]]
    top_heads: list[tuple[str, float]]
    top_neurons: list[tuple[str, float]]
    completeness_error: float
    seconds: float
    top_latents: list[tuple[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        def fmt(items: list[tuple[str, float]]) -> str:
            return ", ".join(f"{name} {value:+.3f}" for name, value in items)

        return "\n".join(
            [
                f"target: {self.target} = {self.target_value:.4f}",
                f"top tokens:  {fmt(self.top_tokens)}",
                f"top heads:   {fmt(self.top_heads)}",
                f"top neurons: {fmt(self.top_neurons) or '(attention-only model)'}",
                *([f"top latents: {fmt(self.top_latents)}"] if self.top_latents else []),
                f"scores sum to the target within {self.completeness_error:.1e} (relative)",
                f"computed in {self.seconds:.1f} s; report: {self.path}",
            ]
        )


def make_target(model: TLModel, target: str | None, wrong: str | None, prompt: str) -> Target:
    """``LogitDiff(target, wrong)``, ``Logit(target)``, or the model's own top prediction."""
    if target is not None and wrong is not None:
        return dp.LogitDiff(target, wrong)
    if target is not None:
        return dp.Logit(target)
    with torch.no_grad():
        top = int(model(prompt)[0, -1].argmax())
    return dp.Logit(top)


def run_demo(
    model: TLModel,
    prompt: str,
    target: Target,
    out: str | Path = "depass_report.html",
    *,
    title: str = "DePass report",
    sae: Any | None = None,
) -> DemoResult:
    """Token, head and neuron attribution plus per-layer contributions, written to ``out``;
    with ``sae``, also every active latent's score (an :class:`~depass_lens.SAELatents` source)."""
    start = time.perf_counter()
    depass = dp.DePass(model)
    sources: list[dp.Source] = [dp.Tokens(), dp.Heads()]
    if not depass.adapter.attn_only:
        sources.append(dp.Neurons())
    attribution = depass.attribute(prompt, target, sources)
    tokens = depass.prepare(prompt).str_tokens
    str_tokens = tokens[0] if tokens else None
    token_part = attribution.restrict("token")
    head_part = attribution.restrict("head")
    lens = depass.run(prompt, dp.Tokens()).logit_lens(target)[:, 0]  # layer comp
    top_tokens = token_part.top(5)
    order = lens[-1, :-1].abs().argsort(descending=True)[:5].tolist()
    names = [f"{i}:{str_tokens[i] if str_tokens else i}" for i in order]

    report = Report(title)
    report.add(
        "Summary",
        f"prompt: {prompt!r}\ntarget: {attribution.target_names[0]} = "
        f"{float(attribution.target_values[0, 0]):.4f}\nmode: {attribution.mode}, rule: "
        f"{attribution.rule}",
    )
    report.add(
        "Token attribution",
        "Each prompt token's share of the target.",
        plot.tokens(token_part, str_tokens),
    )
    report.add(
        "Head attribution",
        "Each head's direct output, propagated to the target.",
        plot.heads(head_part),
    )
    top_neurons: list[tuple[str, float]] = []
    if not depass.adapter.attn_only:
        neuron_part = attribution.restrict("neuron")
        report.add("Top neurons", "", plot.neurons(neuron_part, k=20))
        top_neurons = neuron_part.top(5)
    report.add(
        "Layer by layer",
        "The five most important tokens' shares of the target read out after each layer (logit "
        "lens on the decomposed stream).",
        plot.layer_contributions(lens[:, order], names),
    )
    top_latents: list[tuple[str, float]] = []
    if sae is not None:
        latents = depass.attribute(prompt, target, dp.SAELatents(sae))
        report.add(
            "SAE latents",
            "Each active latent's share of the target (its decoder contribution a_i W_dec[i] "
            "propagated), labelled with the tokens its decoder vector promotes; the SAE's "
            f"reconstruction error is its own component (score "
            f"{float(latents.of_kind('sae_error').sum()):+.3f}).",
            plot.latents(latents, depass, sae, k=15),
        )
        top_latents = latents.top(5)
    try:
        graph = depass.graph(prompt, target, attention="symmetric")
    except UnsupportedModelError as error:  # e.g. grouped-query attention on a TransformerBridge
        report.add("Circuit", f"No circuit graph for this model: {error}.")
    else:
        conservation = max(graph.conservation().values())
        report.add(
            "Circuit",
            "The 30 strongest edges of the circuit graph (attention='symmetric', so edges into "
            "queries and keys count too): what each node sends through each other node's query, "
            "key, value or MLP input. Conservation holds at every node (largest violation "
            f"{conservation:.1e}). `depass-lens graph` gives the full report with corrupted "
            "prompts and edge patching.",
            plot.graph(graph, k=30),
        )
    path = report.write(out)
    return DemoResult(
        path=path,
        target=attribution.target_names[0],
        target_value=float(attribution.target_values[0, 0]),
        top_tokens=top_tokens,
        top_heads=head_part.top(5),
        top_neurons=top_neurons,
        completeness_error=attribution.completeness_error(),
        seconds=time.perf_counter() - start,
        top_latents=top_latents,
    )
