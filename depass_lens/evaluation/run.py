"""One call to evaluate every registered method at one level, with report files.

``evaluate(model, batch, "heads")`` times every component method, draws top-k and bottom-k
masking curves (zero- and mean-ablation), and compares each ranking with exhaustive ablation (the
ground truth). ``"tokens"`` draws Disrupt-top and Recover-top curves; ``"subspace"`` masks the
tokens each method ranks highest for a probe and tracks the probe's reading.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

import depass_lens as dp
from depass_lens.evaluation import baselines
from depass_lens.evaluation.metrics import TaskBatch, precision_at_k, spearman
from depass_lens.evaluation.protocols import Curve, component_curves, probe_curves, token_curves
from depass_lens.report import Report


@dataclass
class EvalReport:
    """Per method: wall time, curves (with areas) and agreement with the ground truth."""

    level: str
    model: str
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, dict[str, Curve]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "model": self.model,
            "notes": self.notes,
            "methods": {
                name: {**info, "curves": {k: c.to_dict() for k, c in self.curves[name].items()}}
                for name, info in self.methods.items()
            },
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def table(self) -> list[dict[str, Any]]:
        """One row per method: areas of every curve, agreement numbers, seconds."""
        rows = []
        for name, info in self.methods.items():
            row: dict[str, Any] = {"method": name, "seconds": round(info["seconds"], 3)}
            for curve_name, curve in self.curves[name].items():
                key = next(iter(curve.values))
                row[f"{curve_name} area ({key})"] = round(curve.area(key), 4)
            row.update({k: round(v, 3) for k, v in info.get("agreement", {}).items()})
            rows.append(row)
        return rows

    def markdown(self) -> str:
        rows = self.table()
        if not rows:
            return ""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def to_html(self, path: str | Path) -> Path:
        report = Report(f"DePass faithfulness: {self.model}, {self.level}")
        report.add("Summary", self.markdown() + "\n" + json.dumps(self.notes, indent=1))
        names = {c for per in self.curves.values() for c in per}
        for curve_name in sorted(names):
            fig = go.Figure()
            for method, per in self.curves.items():
                if curve_name in per:
                    curve = per[curve_name]
                    key = next(iter(curve.values))
                    fig.add_trace(
                        go.Scatter(
                            x=curve.grid, y=curve.values[key], mode="lines+markers", name=method
                        )
                    )
            fig.update_layout(
                xaxis_title="fraction masked", yaxis_title=curve_name, template="plotly_white"
            )
            report.add(curve_name, "", fig)
        return report.write(path)


def _ground_truth_importance(ground_truth: dict[str, Any], level: str) -> torch.Tensor | None:
    key = "heads_mean" if level == "heads" else "neurons_mean"
    if key not in ground_truth:
        return None
    return -torch.tensor(ground_truth[key], dtype=torch.float64).flatten()  # drop when removed


def evaluate(
    model: HookedTransformer,
    batch: TaskBatch,
    level: str,
    methods: Sequence[str] | None = None,
    *,
    ground_truth: dict[str, Any] | None = None,
    circuit_size: int | None = None,
    probe: dict[str, Any] | None = None,
    name: str = "model",
) -> EvalReport:
    """Run the protocols of ``level`` (tokens, heads, neurons, subspace) for every method."""
    report = EvalReport(level, name)
    if level in ("heads", "neurons"):
        registry = baselines.COMPONENT_METHODS
        chosen = list(methods) if methods is not None else list(registry)
        truth = _ground_truth_importance(ground_truth or {}, level)
        k = circuit_size or (max(1, model.cfg.n_heads) if level == "heads" else 20)
        report.notes.update(
            {"circuit_size_k": k, "ranking": "batch-mean score", "n_prompts": len(batch)}
        )
        for method in tqdm(chosen, desc=f"{level} methods", leave=False):
            start = time.perf_counter()
            scores = registry[method](model, batch, level).detach().float()
            seconds = time.perf_counter() - start
            mean = scores.mean(0).double()
            info: dict[str, Any] = {"seconds": seconds}
            if truth is not None:
                info["agreement"] = {
                    "spearman": spearman(mean, truth),
                    f"precision@{k}": precision_at_k(mean, truth, k),
                }
            report.methods[method] = info
            report.curves[method] = {
                f"{which}-k {kind}-ablation": component_curves(
                    model, batch, scores, level, which=which, kind=kind
                )
                for which in ("top", "bottom")
                for kind in ("zero", "mean")
            }
        return report
    if level == "tokens":
        registry_t = baselines.TOKEN_METHODS
        chosen = list(methods) if methods is not None else list(registry_t)
        report.notes.update(
            {
                "masking": "replace by <pad>",
                "n_prompts": len(batch),
                "target": "probability of the model's original answer",
            }
        )
        for method in tqdm(chosen, desc="token methods", leave=False):
            start = time.perf_counter()
            scores = registry_t[method](model, batch).detach().float()
            report.methods[method] = {"seconds": time.perf_counter() - start}
            report.curves[method] = {
                mode: token_curves(model, batch, scores, mode=mode)
                for mode in ("disrupt", "recover")
            }
        return report
    if level == "subspace":
        if probe is None:
            raise ValueError("subspace evaluation needs a probe: {'hook', 'direction'}")
        direction = torch.tensor(probe["direction"], dtype=torch.float32)
        hook = probe["hook"]
        target = dp.Direction(direction, pos=-1, hook=hook, name="probe")

        def depass_ranker(rule: str) -> Callable[[], torch.Tensor]:
            def rank() -> torch.Tensor:
                depass = dp.DePass(model, rule=rule, progress=False)
                return depass.attribute(batch.tokens, target, dp.Tokens()).tokens()[:, 0]

            return rank

        rankers = {f"depass-{rule}": depass_ranker(rule) for rule in baselines.RULES}
        rankers["grad-x-input"] = lambda: _probe_grad_x_input(model, batch.tokens, direction, hook)
        rankers["attention"] = lambda: baselines.attention_last_layer(model, batch)
        rankers["random"] = lambda: baselines.random_tokens(model, batch)
        report.notes.update({"probe_hook": hook, "reading": "<direction, state[-1]>"})
        for method, fn in rankers.items():
            start = time.perf_counter()
            scores = fn().detach().float()
            report.methods[method] = {"seconds": time.perf_counter() - start}
            report.curves[method] = {
                "probe change": probe_curves(model, batch.tokens, scores, direction, hook)
            }
        return report
    raise ValueError(f"level must be tokens, heads, neurons or subspace, not {level!r}")


def _probe_grad_x_input(model, tokens, direction, hook):
    """Gradient x input of the probe reading w.r.t. the residual input (embedding + positions)."""
    store: dict[str, torch.Tensor] = {}

    def grab(value, hook):
        value = value.detach().requires_grad_(True)
        store[hook.name] = value
        return value

    def read(value, hook):
        store["reading"] = value[:, -1] @ direction.to(value.dtype)

    additive = model.cfg.positional_embedding_type == "standard"
    names = ["hook_embed"] + (["hook_pos_embed"] if additive else [])
    with torch.enable_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, grab) for n in names] + [(hook, read)])
        (grad,) = torch.autograd.grad(store["reading"].sum(), [store["hook_embed"]])
    return (grad * sum(store[n].detach() for n in names)).sum(-1)
