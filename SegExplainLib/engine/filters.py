"""Amplitude filters on relevance (Tjoa et al. 2020, LRP on a 3D U-Net for ischemic stroke lesions).

The relevance ``f`` is normalized per channel, ``f1 = f / N`` with ``N = max|f|`` over that channel, the filter ``P``
is applied to ``f1`` and the result is scaled back to ``N * P[f1]``. A channel with ``N == 0`` is all zeros and
stays all zeros.

* alpha-pass ``P_alpha`` keeps the values with ``a1 <= |f1| <= a2`` and zeroes the rest.
* alpha-clamp ``C_alpha`` clamps the values with ``|f1| > a2`` to ``sign(f1) * a2`` and zeroes those with
  ``|f1| < a1``. The paper defines the clamp only for a single bound ``a``; for a range we read the lower bound as a
  cut-off, as in the pass filter, so that the single-bound form is the range ``(0, a)``.

Example:
    Keep only the strong evidence of a DWI/FLAIR relevance map ``r`` shaped ``(2, D, H, W)``::

        strong = pass_filter(r, (0.5, 1.0))
        flat = AmplitudeFilter.parse("clamp:0.2")(r)   # saturate the few very large values
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np
import torch

from ..errors import SegExplainError

__all__ = ["AmplitudeFilter", "FilterKind", "clamp_filter", "pass_filter"]

FilterKind = Literal["pass", "clamp"]
_KINDS: tuple[str, ...] = get_args(FilterKind)
_NUMPY_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

MapT = TypeVar("MapT", np.ndarray, torch.Tensor)


def _is_real(value: object) -> bool:
    # bool is an Integral, but "alpha=True" is a typo rather than the bound 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class AmplitudeFilter:
    """An alpha-pass or alpha-clamp filter on the normalized amplitude ``|f1| = |f| / max|f|``.

    Attributes:
        kind: ``"pass"`` keeps ``a1 <= |f1| <= a2`` and zeroes the rest; ``"clamp"`` clamps ``|f1| > a2`` to
            ``a2`` (keeping the sign) and zeroes ``|f1| < a1``.
        alpha: The range ``(a1, a2)`` with ``0 <= a1 < a2 <= 1``; use :meth:`create` to give a single bound ``a``,
            which means ``(0, a)``.

    Example:
        >>> f = AmplitudeFilter.create("pass", 0.4)   # the weak-evidence band of a T1/T2/FLAIR map
        >>> f.alpha, str(f)
        ((0.0, 0.4), 'pass:0.4')
    """

    kind: FilterKind
    alpha: tuple[float, float]

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise SegExplainError(f"kind must be one of {', '.join(map(repr, _KINDS))}, got {self.kind!r}")
        alpha = self.alpha
        if not (isinstance(alpha, (tuple, list)) and len(alpha) == 2 and all(map(_is_real, alpha))):
            raise SegExplainError(f"alpha must be a pair of numbers (a1, a2), got {alpha!r}")
        low, high = float(alpha[0]), float(alpha[1])
        if not 0.0 <= low < high <= 1.0:
            raise SegExplainError(f"alpha must satisfy 0 <= a1 < a2 <= 1, got {alpha!r}")
        object.__setattr__(self, "alpha", (low, high))

    @classmethod
    def create(cls, kind: FilterKind, alpha: float | tuple[float, float]) -> AmplitudeFilter:
        """Build a filter from a single bound ``a`` (the range ``(0, a)``) or a pair ``(a1, a2)``.

        Args:
            kind: ``"pass"`` or ``"clamp"``.
            alpha: A number in ``(0, 1]`` or a pair with ``0 <= a1 < a2 <= 1``.

        Returns:
            The validated filter. ``AmplitudeFilter.create(**f.to_dict())`` rebuilds ``f``.

        Example:
            >>> AmplitudeFilter.create("clamp", (0.05, 0.4)).alpha
            (0.05, 0.4)
        """
        if _is_real(alpha):
            if not 0.0 < alpha <= 1.0:
                raise SegExplainError(f"alpha must lie in (0, 1], got {alpha!r}")
            alpha = (0.0, alpha)
        return cls(kind, alpha)

    @classmethod
    def parse(cls, text: str) -> AmplitudeFilter:
        """Read the command-line form ``"<kind>:<a>"`` or ``"<kind>:<a1>,<a2>"``.

        Args:
            text: For example ``"pass:0.4"``, ``"clamp:0.2"`` or ``"pass:0.05,0.4"``.

        Returns:
            The validated filter; ``str()`` gives the text back.

        Example:
            >>> AmplitudeFilter.parse("pass:0.05,0.4")
            AmplitudeFilter(kind='pass', alpha=(0.05, 0.4))
        """
        expected = "'<kind>:<a>' or '<kind>:<a1>,<a2>' such as 'pass:0.4' or 'clamp:0.05,0.4'"
        if not isinstance(text, str) or text.count(":") != 1:
            raise SegExplainError(f"amplitude filter must look like {expected}, got {text!r}")
        kind, bounds = (part.strip() for part in text.split(":"))
        try:
            values = [float(value) for value in bounds.split(",")]
        except ValueError:
            raise SegExplainError(f"amplitude filter must look like {expected}, got {text!r}") from None
        if len(values) > 2:
            raise SegExplainError(f"amplitude filter must look like {expected}, got {text!r}")
        return cls.create(kind, values[0] if len(values) == 1 else (values[0], values[1]))  # type: ignore[arg-type]

    def __str__(self) -> str:
        low, high = self.alpha
        bounds = f"{high!r}" if low == 0.0 else f"{low!r},{high!r}"
        return f"{self.kind}:{bounds}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, ``{"kind": "pass", "alpha": [a1, a2]}``, accepted by :meth:`create`."""
        return {"kind": self.kind, "alpha": list(self.alpha)}

    def factor(self, r: torch.Tensor, *, channel_dim: int = 1) -> torch.Tensor:
        """Multiplicative factor ``F`` such that ``r * F`` is the filtered tensor.

        ``N = max|r|`` is taken per batch element and channel, over every dim after ``channel_dim``; a tensor with
        no dim after ``channel_dim`` (the ``(B, F)`` activation of a Linear layer) is normalized over
        ``channel_dim`` itself. The pass factor is 0 or 1; the clamp factor is ``min(1, a2 * N / |r|)`` (1 where
        ``r == 0``) and 0 where ``|r| / N < a1``. This is the form the LRP engine multiplies into its backward
        signal at every layer (Tjoa's layer-wise mode).

        Args:
            r: Floating-point tensor of rank >= 2, on any device, e.g. the relevance ``(B, C, D, H, W)`` reaching
                a convolution of a 3D U-Net.
            channel_dim: The channel dim; negative values count from the end.

        Returns:
            A detached tensor with the shape, dtype and device of ``r``.

        Example:
            >>> r = torch.tensor([[4.0, -1.0, 0.5]])       # (B, F) relevance of a Linear layer
            >>> AmplitudeFilter.create("clamp", 0.5).factor(r)
            tensor([[0.5000, 1.0000, 1.0000]])
        """
        if not isinstance(r, torch.Tensor) or not r.is_floating_point() or r.dim() < 2:
            shown = f"{r.dtype} tensor of rank {r.dim()}" if isinstance(r, torch.Tensor) else type(r).__name__
            raise SegExplainError(f"r must be a floating-point torch tensor of rank >= 2, got a {shown}")
        rank = r.dim()
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool) or not -rank <= channel_dim < rank:
            raise SegExplainError(
                f"channel_dim must be an int in [{-rank}, {rank - 1}] for r of rank {rank}, got {channel_dim!r}"
            )
        channel_dim %= rank
        dims = tuple(range(channel_dim + 1, rank)) or (channel_dim,)
        low, high = self.alpha
        with torch.no_grad():
            amplitude = r.detach().abs()
            norm = amplitude.amax(dim=dims, keepdim=True)
            # An all-zero channel has N == 0; taking N = 1 keeps it at zero instead of NaN. The bounds are scaled
            # by N rather than |r| divided by N: one pass less over the tensor.
            norm = torch.where(norm > 0, norm, torch.ones_like(norm))
            keep = amplitude >= low * norm
            if self.kind == "pass":
                return keep.logical_and_(amplitude <= high * norm).to(r.dtype)
            # a2 N / max(a2 N, |r|) is min(1, a2 N / |r|) without a division by zero.
            ceiling = high * norm
            return ceiling / amplitude.clamp_(min=ceiling) * keep

    def __call__(self, r: MapT) -> MapT:
        """Filter one explanation map post hoc, normalizing each channel (input MRI sequence) by its own ``max|r|``.

        Args:
            r: Numpy array or torch tensor ``(C, D, H, W)`` of float16, float32 or float64.

        Returns:
            The filtered map, of the same type, shape and dtype (and device) as ``r``.

        Example:
            >>> t1_flair = torch.randn(2, 8, 8, 8)                  # one map per MRI sequence
            >>> AmplitudeFilter.parse("pass:0.6,1")(t1_flair).shape
            torch.Size([2, 8, 8, 8])
        """
        if isinstance(r, np.ndarray):
            if r.dtype not in _NUMPY_FLOATS:
                raise SegExplainError(f"r must have dtype float16, float32 or float64, got {r.dtype}")
            tensor = torch.from_numpy(np.ascontiguousarray(r))
            return (tensor * self._map_factor(tensor)).numpy()
        if isinstance(r, torch.Tensor):
            return r * self._map_factor(r)
        raise SegExplainError(f"r must be a numpy array or a torch tensor, got {type(r).__name__}")

    def _map_factor(self, r: torch.Tensor) -> torch.Tensor:
        if r.dim() != 4:
            raise SegExplainError(f"r must be one map shaped (C, D, H, W), got shape {tuple(r.shape)}")
        return self.factor(r, channel_dim=0)


def pass_filter(r: MapT, alpha: float | tuple[float, float]) -> MapT:
    """Alpha-pass a ``(C, D, H, W)`` map post hoc: keep ``a1 <= |f1| <= a2`` per channel, zero the rest.

    Example:
        >>> dwi_adc = np.random.default_rng(0).normal(size=(2, 8, 8, 8))
        >>> kept = pass_filter(dwi_adc, 0.4)      # only the weak relevance of DWI and ADC survives
    """
    return AmplitudeFilter.create("pass", alpha)(r)


def clamp_filter(r: MapT, alpha: float | tuple[float, float]) -> MapT:
    """Alpha-clamp a ``(C, D, H, W)`` map post hoc: clamp ``|f1| > a2`` to ``a2`` and zero ``|f1| < a1``.

    Example:
        >>> dwi_adc = np.random.default_rng(0).normal(size=(2, 8, 8, 8))
        >>> flat = clamp_filter(dwi_adc, 0.2)     # hot spots no longer hide the rest of the lesion
    """
    return AmplitudeFilter.create("clamp", alpha)(r)
