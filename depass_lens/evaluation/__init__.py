"""Faithfulness evaluation: the DePass paper's protocols and baselines, on any HookedTransformer.

>>> from depass_lens.evaluation import TaskBatch, evaluate
>>> batch = TaskBatch(tokens, answer_ids, wrong_ids, corrupted_tokens)
>>> report = evaluate(model, batch, "heads", ground_truth="ablation-mean")
>>> print(report.markdown()); report.to_html("heads.html")

Modules: ``metrics`` (target metrics), ``task_batch``, ``levels`` (component numbering),
``token_baselines`` / ``component_baselines`` / ``subspace`` (baselines), ``baselines`` and
``registry`` (method registries), ``token_level`` / ``component_level`` / ``subspace``
(protocols), ``agreement`` (Spearman, precision@k, baseline-relative scores), ``run``
(the runner and its report). DePass methods (``depass_methods``) are registered here but import
the engine only when they run.
"""

from depass_lens.evaluation import baselines
from depass_lens.evaluation.agreement import (
    agreement,
    baseline_relative,
    precision_at_k,
    rankdata,
    spearman,
)
from depass_lens.evaluation.baselines import (
    COMPONENT_METHODS,
    SUBSPACE_METHODS,
    TOKEN_METHODS,
    component_sign,
    register_component_method,
    register_subspace_method,
    register_token_method,
)
from depass_lens.evaluation.component_level import component_curves, component_masking_curve
from depass_lens.evaluation.curves import DEFAULT_GRID, Curve, trapezoid_area
from depass_lens.evaluation.depass_methods import register_depass_methods
from depass_lens.evaluation.metrics import (
    AnswerMetric,
    Metric,
    logit_diff_metric,
    logit_metric,
    prob_metric,
)
from depass_lens.evaluation.run import EvalReport, MethodResult, evaluate
from depass_lens.evaluation.subspace import (
    Probe,
    compare_probe_rankings,
    probe_masking_curve,
    probe_reading,
)
from depass_lens.evaluation.task_batch import TaskBatch
from depass_lens.evaluation.token_level import (
    disrupt_top,
    recover_top,
    token_curves,
    token_masking_curve,
)

register_depass_methods()

__all__ = [
    "COMPONENT_METHODS",
    "DEFAULT_GRID",
    "SUBSPACE_METHODS",
    "TOKEN_METHODS",
    "AnswerMetric",
    "Curve",
    "EvalReport",
    "MethodResult",
    "Metric",
    "Probe",
    "TaskBatch",
    "agreement",
    "baseline_relative",
    "baselines",
    "compare_probe_rankings",
    "component_curves",
    "component_masking_curve",
    "component_sign",
    "disrupt_top",
    "evaluate",
    "logit_diff_metric",
    "logit_metric",
    "precision_at_k",
    "prob_metric",
    "probe_masking_curve",
    "probe_reading",
    "rankdata",
    "recover_top",
    "register_component_method",
    "register_depass_methods",
    "register_subspace_method",
    "register_token_method",
    "spearman",
    "token_curves",
    "token_masking_curve",
    "trapezoid_area",
]
