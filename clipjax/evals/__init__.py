"""Evaluation: evaluators as plug-ins (zero-shot, retrieval, linear probe, kNN, classification
datasets, embedding spectrum), selected by the named sections of `config.evals`, and the report.

Adding an evaluator is a new file with a `@register_evaluator` class and one import line below.
"""

from clipjax.evals.base import EVALUATORS, EvalData, Evaluator, register_evaluator
from clipjax.evals.encoders import Encoders

# Built-in evaluators: one line each (importing a module registers its evaluator).
from clipjax.evals import zero_shot as _zero_shot  # noqa: E402,F401
from clipjax.evals import retrieval as _retrieval  # noqa: E402,F401
from clipjax.evals import linear_probe as _linear_probe  # noqa: E402,F401
from clipjax.evals import knn as _knn  # noqa: E402,F401
from clipjax.evals import logistic_probe as _logistic_probe  # noqa: E402,F401
from clipjax.evals import classification as _classification  # noqa: E402,F401
from clipjax.evals import caption_retrieval as _caption_retrieval  # noqa: E402,F401
from clipjax.evals import spectrum as _spectrum  # noqa: E402,F401
from clipjax.evals import captioning as _captioning  # noqa: E402,F401
from clipjax.evals import dense as _dense  # noqa: E402,F401

__all__ = ["EVALUATORS", "EvalData", "Encoders", "Evaluator", "register_evaluator"]
