"""One call to evaluate every registered method at one level: ``evaluate(...) -> EvalReport``.

``"heads"`` / ``"neurons"`` / ``("neurons", layer)``: times every component method, draws top-k
and bottom-k ablation curves (zero and mean) from its importance-oriented scores, and compares
them with a ground truth (exhaustive ablation) when one is given. ``"tokens"``: Disrupt-top and
Recover-top curves. ``"subspace"``: masks the tokens each method ranks highest for a probe.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.evaluation.agreement import agreement
from depass_lens.evaluation.component_level import component_curves
from depass_lens.evaluation.curves import DEFAULT_GRID
from depass_lens.evaluation.eval_report import EvalReport, MethodResult
from depass_lens.evaluation.levels import Level, resolve_level
from depass_lens.evaluation.metrics import Metric
from depass_lens.evaluation.registry import (
    COMPONENT_METHODS,
    SUBSPACE_METHODS,
    TOKEN_METHODS,
    component_sign,
)
from depass_lens.evaluation.subspace import Probe, probe_masking_curve
from depass_lens.evaluation.task_batch import TaskBatch
from depass_lens.evaluation.token_level import token_curves

__all__ = ["EvalReport", "MethodResult", "component_truth", "evaluate"]


@dataclass
class _Run:
    """What every level's loop shares: the model, the batch, and the call's settings."""

    model: TLModel
    batch: TaskBatch
    metric: Metric
    methods: Sequence[str] | None
    options: Mapping[str, Mapping[str, Any]]
    masking: dict[str, Any]
    progress: bool
    report: EvalReport
    extra: dict[str, Any] = field(default_factory=dict)

    def scores(self, table: Mapping[str, Any], desc: str, first: Any, **kwargs: Any):
        """Yield ``(name, result, scores)`` for each method that ran (skips are recorded)."""
        explicit = self.methods is not None
        for name in tqdm(list(self.methods or table), desc=desc, disable=not self.progress):
            fn = table[name]
            call = {**kwargs, **self.options.get(name, {})}
            if "progress" not in call and _accepts(fn, "progress"):
                call["progress"] = self.progress  # the run's setting reaches slow methods too
            start = time.perf_counter()
            try:
                scores = fn(self.model, self.batch.tokens, first, **call)
            except (ValueError, NotImplementedError) as error:
                if explicit:
                    raise
                skipped = f"{type(error).__name__}: {error}"
                self.report.methods[name] = MethodResult(
                    time.perf_counter() - start, skipped=skipped
                )
                continue
            result = self.report.methods[name] = MethodResult(time.perf_counter() - start)
            yield name, result, scores.detach()


def _accepts(fn: Any, keyword: str) -> bool:
    """Whether ``fn`` takes ``keyword`` (methods may be any callable)."""
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def component_truth(
    ground_truth: Tensor | Mapping[str, Any] | str | None,
    model: TLModel,
    batch: TaskBatch,
    metric: Metric,
    level: Level,
    *,
    key: str = "mean",
) -> Tensor | None:
    """Ground-truth change effects ``[n_comp]`` or ``[batch n_comp]`` for ``level``.

    A tensor is taken as is; a zoo ablation dict gives ``{kind}_{key}`` (e.g. ``heads_mean``,
    one layer's row for ``("neurons", layer)``); a method name (``"ablation-mean"``) is run on
    the batch.
    """
    if ground_truth is None:
        return None
    spec = resolve_level(model, level)
    if isinstance(ground_truth, str):
        fn = COMPONENT_METHODS[ground_truth]
        return fn(model, batch.tokens, metric, level=level, **batch.component_inputs())
    if isinstance(ground_truth, Mapping):
        table = torch.as_tensor(ground_truth[f"{spec.kind}_{key}"], dtype=torch.float64)
        if spec.kind == "neurons" and len(spec.layers) == 1:
            table = table[spec.layers[0]]
        return table.flatten()
    return torch.as_tensor(ground_truth)


def token_truth(ground_truth: Tensor | str | Any, run: _Run, truth_sign: int) -> Tensor | None:
    """Token importance ``[batch pos]``: a method's scores (e.g. ``"occlusion"``) as they are, or
    given change effects times ``truth_sign``. A component table (zoo ablation dict) is ignored."""
    if ground_truth is None or isinstance(ground_truth, Mapping):
        return None
    if isinstance(ground_truth, str):
        fn = TOKEN_METHODS[ground_truth]
        mask = run.batch.attention_mask
        return fn(run.model, run.batch.tokens, run.metric, attention_mask=mask).detach()
    return truth_sign * torch.as_tensor(ground_truth)


def _describe(ground_truth: Any) -> str | None:
    if ground_truth is None or isinstance(ground_truth, str):
        return ground_truth
    return "zoo ablation effects" if isinstance(ground_truth, Mapping) else "given effects"


def _tokens(run: _Run, truth: Tensor | None, ks: Sequence[int]) -> None:
    run.report.notes.update(
        {"protocols": "Disrupt-top (lower is better), Recover-top (higher is better)"}
    )
    mask = run.batch.attention_mask
    for _, result, scores in run.scores(
        TOKEN_METHODS, "token methods", run.metric, attention_mask=mask
    ):
        result.curves = token_curves(
            run.model, run.batch.tokens, scores, metric=run.metric, attention_mask=mask,
            **run.masking,
        )  # fmt: skip
        if truth is not None:
            result.agreement = agreement(scores, truth, ks=ks, by="signed", per_example=True)


def _subspace(run: _Run, probe: Probe) -> None:
    run.report.notes.update(
        {"probe_hook": probe.hook, "probe_pos": probe.pos,
         "protocol": "mask the top |score| tokens; a larger change of the reading is better"}
    )  # fmt: skip
    mask = run.batch.attention_mask
    for _, result, scores in run.scores(
        SUBSPACE_METHODS, "subspace methods", probe, attention_mask=mask
    ):
        curve = probe_masking_curve(
            run.model, run.batch.tokens, scores, probe, attention_mask=mask, **run.masking
        )
        result.curves = {curve.name: curve}


def _components(run: _Run, level: Level, truth: Tensor | None, ks: Sequence[int]) -> None:
    batch = run.batch
    for name, result, scores in run.scores(
        COMPONENT_METHODS, f"{run.report.level} methods", run.metric, level=level,
        **batch.component_inputs(),
    ):  # fmt: skip
        importance = component_sign(name) * scores.double()
        result.curves = component_curves(
            run.model, batch.tokens, importance, run.metric, level=level,
            reference_tokens=batch.reference_tokens, attention_mask=batch.attention_mask,
            wrong_ids=batch.wrong_ids, **run.extra,
        )  # fmt: skip
        if truth is not None:
            result.agreement = agreement(importance, truth, ks=ks, by="signed")
            by_abs = agreement(importance, truth, ks=ks, by="abs")
            result.agreement.update(
                {f"{k} (abs)": v for k, v in by_abs.items() if k.startswith("precision")}
            )


def evaluate(
    model: TLModel,
    task_batch: TaskBatch,
    level: Level | str,
    methods: Sequence[str] | None = None,
    *,
    metric: Metric | None = None,
    ground_truth: Tensor | Mapping[str, Any] | str | None = None,
    ground_truth_key: str = "mean",
    truth_sign: int = -1,
    agreement_ks: Sequence[int] | None = None,
    circuit_size: int | None = None,
    ablations: Sequence[str] = ("zero", "mean"),
    component_ks: Sequence[int] | None = None,
    rank: str = "mean",
    mean_over: str = "all",
    masking: str = "replace",
    fill_id: int | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    protect_bos: bool | None = None,
    protect_query: bool = True,
    probe: Probe | Mapping[str, Any] | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "model",
    progress: bool = True,
) -> EvalReport:
    """Run the protocols of ``level`` for every registered method (or those named).

    Args:
        level: ``"tokens"``, ``"heads"``, ``"neurons"``, ``("neurons", layer)`` or
            ``"subspace"`` (needs ``probe``: a :class:`Probe` or ``{"hook", "direction"}``).
        methods: registry names; ``None`` runs all, recording the ones that cannot run on this
            batch (missing corrupted prompts, unsupported model) as skipped.
        metric: default ``task_batch.metric()`` (logit difference or answer logit).
        ground_truth: components: change effects (tensor ``[n_comp]`` / ``[batch n_comp]``, a
            zoo ablation dict read at ``{kind}_{ground_truth_key}``, or a method name such as
            ``"ablation-mean"``); tokens: per-prompt effects ``[batch pos]`` or a token method
            name (``"occlusion"``, taken as importance). Effects are multiplied by
            ``truth_sign`` (``-1``: a drop when removed = important) and compared with each
            method's importance-oriented scores (Spearman, precision@k for ``agreement_ks``,
            default ``[circuit_size]`` or ``[n_heads]`` / 5% of the neurons / ``[3]`` tokens).
        ablations: component protocol setting (``component_level.component_masking_curve``).
        component_ks: component protocol setting (as above).
        rank: component protocol setting (as above).
        mean_over: component protocol setting (as above).
        masking: token and subspace protocol setting (``token_level.token_masking_curve``).
        fill_id: token and subspace protocol setting (as above).
        grid: token and subspace protocol setting (as above).
        protect_bos: token and subspace protocol setting (as above).
        protect_query: token and subspace protocol setting (as above).
        method_options: extra keyword arguments per method name (e.g. IG ``steps``).
    """
    level_name = level if isinstance(level, str) else f"{level[0]}[{level[1]}]"
    report = EvalReport(level_name, name)
    masking_options = dict(
        masking=masking, fill_id=fill_id, grid=grid, protect_bos=protect_bos,
        protect_query=protect_query,
    )  # fmt: skip
    run = _Run(
        model, task_batch, task_batch.metric() if metric is None else metric, methods,
        dict(method_options or {}), masking_options, progress, report,
    )  # fmt: skip
    report.notes.update({"n_prompts": len(task_batch), "n_pos": int(task_batch.tokens.shape[1])})
    if circuit_size is not None and agreement_ks is None:
        agreement_ks = [circuit_size]
    if level == "tokens":
        report.notes.update({**masking_options, "ground_truth": _describe(ground_truth)})
        _tokens(run, token_truth(ground_truth, run, truth_sign), list(agreement_ks or [3]))
        return report
    if level == "subspace":
        if probe is None:
            raise ValueError("subspace evaluation needs a probe (Probe or {'hook', 'direction'})")
        report.notes.update(masking_options)
        _subspace(run, Probe.coerce(probe))
        return report
    spec = resolve_level(model, level)  # type: ignore[arg-type]
    raw = component_truth(ground_truth, model, task_batch, run.metric, level, key=ground_truth_key)  # type: ignore[arg-type]
    truth = None if raw is None else truth_sign * raw.double()
    default_k = make_adapter(model).n_heads if spec.kind == "heads" else max(1, spec.n_comp // 20)
    ks = list(agreement_ks or [default_k])
    run.extra = dict(ablations=ablations, ks=component_ks, rank=rank, mean_over=mean_over)
    report.notes.update(
        {"n_comp": spec.n_comp, "ranking": f"{rank} importance (sign-oriented scores)",
         "ablations": list(ablations), "mean_over": mean_over, "agreement_ks": ks,
         "ground_truth": _describe(ground_truth), "truth_sign": truth_sign}
    )  # fmt: skip
    _components(run, level, truth, ks)  # type: ignore[arg-type]
    return report
