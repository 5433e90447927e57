"""Saving a figure as PNG or PDF, replacing the file in one step."""

from __future__ import annotations

import math
import numbers
import os
import secrets
from pathlib import Path

from matplotlib.figure import Figure

from ...errors import SegExplainError
from .checks import check_bool

_FORMATS = {".png": "png", ".pdf": "pdf"}

def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float = 120, close: bool = True) -> Path:
    """Write a figure as PNG or PDF (by the suffix of ``path``) atomically.

    The figure is written to a hidden temporary file in the target folder, which then replaces ``path`` with
    ``os.replace``: a reader never sees a half-written file, and no temporary file is left behind, also when
    writing fails.

    Args:
        fig: The figure, e.g. from :func:`mip_figure`.
        path: Target file ending in ``.png`` or ``.pdf`` (any case); its folder must exist.
        dpi: Resolution in dots per inch (for PDF, of embedded raster images).
        close: Close the figure afterwards, whether or not writing succeeded: a pyplot-managed figure is closed
            through pyplot, any other figure is cleared to free its artists.

    Returns:
        The path written.

    Raises:
        SegExplainError: Not a figure, an unknown suffix, a missing folder, a path that is a folder, or bad dpi.

    Example:
        >>> save_figure(mip_figure(image, maps, sequence_names=names), "out/mip.png", dpi=150)
    """
    if not isinstance(fig, Figure):
        raise SegExplainError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if not isinstance(dpi, numbers.Real) or isinstance(dpi, bool) or not math.isfinite(dpi) or dpi <= 0:
        raise SegExplainError(f"dpi must be a positive number, got {dpi!r}")
    close = check_bool(close, "close")
    if not isinstance(path, (str, os.PathLike)):
        raise SegExplainError(f"path must be a file path ending in .png or .pdf, got {path!r}")
    target = Path(path)
    file_format = _FORMATS.get(target.suffix.lower())
    if file_format is None:
        raise SegExplainError(f"path {str(target)!r} has suffix {target.suffix!r}; expected .png or .pdf")
    folder = target.parent
    if not folder.is_dir():
        raise SegExplainError(
            f"folder {str(folder)!r} of path {str(target)!r} does not exist; expected an existing folder"
        )
    if target.is_dir():
        raise SegExplainError(f"path {str(target)!r} is a folder; expected a file path ending in .png or .pdf")

    temporary = folder / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        # 0o666 under the process umask, like an ordinary new file (mkstemp would leave 0o600).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as stream:
            # zlib level 1: a third of the default level's time on noisy images, and files of about the same size.
            options = {"pil_kwargs": {"compress_level": 1}} if file_format == "png" else {}
            fig.savefig(stream, format=file_format, dpi=float(dpi), **options)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if close:
            _close(fig)
    return target


def _close(fig: Figure) -> None:
    manager = getattr(fig.canvas, "manager", None)
    if manager is not None:  # made through pyplot: let pyplot forget it
        from matplotlib import pyplot

        pyplot.close(fig)
    else:
        for ax in list(fig.axes):  # removed, not cleared one by one: clearing rebuilds each axes' ticks first
            fig.delaxes(ax)
        fig.clear()
