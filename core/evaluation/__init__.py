"""The paper's evaluation with baselines: what to run (``config``), the baselines, the runs, and the report."""

from core.evaluation.baselines import BASELINES
from core.evaluation.config import EvalConfig
from core.evaluation.report import aggregate
from core.evaluation.runs import Evaluation, auroc, quality_auroc, run_evaluation

__all__ = ["BASELINES", "EvalConfig", "Evaluation", "aggregate", "auroc", "quality_auroc", "run_evaluation"]
