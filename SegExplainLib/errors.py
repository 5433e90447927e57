"""Error types raised by SegExplainLib.

Every error carries a one-line message that names the offending value and what was expected, so that the command
line and the Slicer module can show it to a user as it is.
"""

from __future__ import annotations


class SegExplainError(ValueError):
    """Bad input to SegExplainLib: the message names the value and what was expected."""


class UnsupportedLayerError(SegExplainError):
    """The model contains a layer or operation that the chosen method cannot propagate through correctly."""


class GridMismatchError(SegExplainError):
    """An image file lies on another grid than the first sequence; resampling it would make it fit.

    Attributes:
        problem: What differs, without the advice, e.g. ``"sequence file 'adc.mha' is not on the grid of 't2.nrrd':
            spacing (2, 2, 2) instead of (1, 1, 1)"``; a caller with another way to ask for resampling (the command
            line's ``--resample``) gives its own advice.
    """

    def __init__(self, problem: str, *, advice: str = "pass resample=True to resample it") -> None:
        super().__init__(f"{problem}; {advice}")
        self.problem = problem
