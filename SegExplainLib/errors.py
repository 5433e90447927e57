"""Error types raised by SegExplainLib.

Every error carries a one-line message that names the offending value and what was expected, so that the command
line and the Slicer module can show it to a user as it is.
"""

from __future__ import annotations


class SegExplainError(ValueError):
    """Bad input to SegExplainLib: the message names the value and what was expected."""


class UnsupportedLayerError(SegExplainError):
    """The model contains a layer or operation that the chosen method cannot propagate through correctly."""
