"""Scores of attribution methods on the user's network and case: faithfulness, randomization, robustness,
localization, and the scorecard that gathers them (:func:`evaluate`)."""

from .scorecard import SCORES, Scorecard, evaluate, evaluation_steps

__all__ = ["SCORES", "Scorecard", "evaluate", "evaluation_steps"]
