"""Faithfulness evaluation: the paper's protocols and baselines, runnable on any model.

>>> from depass_lens.evaluation import TaskBatch, evaluate
>>> report = evaluate(model, TaskBatch(tokens, answers, wrong, corrupted), level="heads")
>>> report.markdown(); report.to_html("heads.html")
"""

from depass_lens.evaluation.baselines import (
    COMPONENT_METHODS,
    TOKEN_METHODS,
    register_component_method,
    register_token_method,
)
from depass_lens.evaluation.metrics import TaskBatch, precision_at_k, spearman, trapezoid_area
from depass_lens.evaluation.protocols import Curve, component_curves, probe_curves, token_curves
from depass_lens.evaluation.run import EvalReport, evaluate

__all__ = [
    "COMPONENT_METHODS",
    "TOKEN_METHODS",
    "Curve",
    "EvalReport",
    "TaskBatch",
    "component_curves",
    "evaluate",
    "precision_at_k",
    "probe_curves",
    "register_component_method",
    "register_token_method",
    "spearman",
    "token_curves",
    "trapezoid_area",
]
