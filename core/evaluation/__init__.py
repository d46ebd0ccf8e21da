"""The paper's evaluation with baselines: what to run (``config``), the baselines, the runs, and the report."""

from core.evaluation.baselines import BASELINES
from core.evaluation.config import EvalConfig
from core.evaluation.crossval import CrossValidation, run_evaluation
from core.evaluation.report import aggregate
from core.evaluation.runs import Evaluation, auroc, quality_auroc

__all__ = [
    "BASELINES",
    "CrossValidation",
    "EvalConfig",
    "Evaluation",
    "aggregate",
    "auroc",
    "quality_auroc",
    "run_evaluation",
]
