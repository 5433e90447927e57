"""The checks the loaders share: option mappings, files by extension, and errors of others' code in one line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import SegExplainError


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an error raised by code we do not control."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

def check_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise SegExplainError(f"{where} must be a mapping of option names to values, got {kwargs!r}")
    return dict(kwargs)

def existing_file(path: Path, what: str, suffixes: Sequence[str]) -> str:
    """The lower-case suffix of ``path`` after checking that it is one of ``suffixes`` and that the file exists."""
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise SegExplainError(
            f"{what} {str(path)!r} has extension {suffix or '(none)'!r}; expected one of {', '.join(suffixes)}"
        )
    if not path.is_file():
        raise SegExplainError(f"{what} {str(path)!r} does not exist")
    return suffix
