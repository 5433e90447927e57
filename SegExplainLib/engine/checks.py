"""Small validation helpers shared by the modules: one message format for every option."""

from __future__ import annotations

from typing import Any, get_args

import numpy as np

from ..errors import SegExplainError


def is_int(value: object) -> bool:
    """An integer (Python or numpy), but not a bool: ``steps=True`` is a typo, not 1."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_choice(value: Any, name: str, choices: Any) -> str:
    """``value`` if it is one of ``choices`` (a tuple of strings or a ``Literal``), else a one-line error."""
    options = get_args(choices) or tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise SegExplainError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def check_triple(value: Any, option: str) -> tuple[int, int, int]:
    """A size per spatial axis ``(D, H, W)`` from one positive integer or three (a window, a block, a mask grid)."""
    if is_int(value):
        values = (int(value),) * 3
    elif isinstance(value, (tuple, list)) and len(value) == 3 and all(is_int(v) for v in value):
        values = tuple(int(v) for v in value)
    else:
        raise SegExplainError(f"{option} must be an integer or 3 integers (D, H, W), got {value!r}")
    if min(values) < 1:
        raise SegExplainError(f"{option} must be >= 1 along every axis, got {value!r}")
    return values  # type: ignore[return-value]
