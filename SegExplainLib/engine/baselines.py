"""Reference inputs ("baselines") for Integrated Gradients and Occlusion.

A baseline maps an input batch ``(B, C, D, H, W)`` to a tensor of the same shape that stands for "no information".
What that means for MRI is a choice, so several are offered:

* :class:`ZeroBaseline`: all zeros. Natural for z-scored inputs (0 is the mean intensity).
* :class:`ConstantBaseline`: one value everywhere.
* :class:`ChannelMinimumBaseline`: per sample and per channel, the minimum of that channel, i.e. roughly the intensity
  of background air in each MRI sequence (useful when inputs are not z-scored, where 0 may be a bright value).
* :class:`BlurredBaseline`: the input blurred per channel by a Gaussian; keeps the low frequencies (overall contrast)
  so that the attribution concentrates on edges and fine structure.

Baselines are small frozen dataclasses: hashable, comparable and serialisable with ``to_dict`` for the record of a
run. :func:`make_baseline` builds one from a short string (``"zero"``, ``"constant:-1.5"``, ``"min"``, ``"blur:3"``),
for the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SegExplainError

__all__ = [
    "Baseline",
    "ZeroBaseline",
    "ConstantBaseline",
    "ChannelMinimumBaseline",
    "BlurredBaseline",
    "make_baseline",
]


def _check_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise SegExplainError(f"baseline input must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 3:
        raise SegExplainError(
            f"baseline input must have shape (B, C, *spatial), got shape {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise SegExplainError(f"baseline input must be a floating point tensor, got dtype {inputs.dtype}")
    return inputs


@dataclass(frozen=True)
class Baseline:
    """Base class: ``baseline(inputs)`` returns a tensor shaped like ``inputs`` (no gradient is tracked)."""

    kind = "abstract"

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = _check_inputs(inputs)
        with torch.no_grad():
            return self._compute(inputs.detach())

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description; :func:`make_baseline` accepts it back."""
        return {"type": self.kind}


@dataclass(frozen=True)
class ZeroBaseline(Baseline):
    """All zeros."""

    kind = "zero"

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(inputs)


@dataclass(frozen=True)
class ConstantBaseline(Baseline):
    """The same finite ``value`` everywhere."""

    value: float = 0.0
    kind = "constant"

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise SegExplainError(f"ConstantBaseline value must be a finite number, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.full_like(inputs, self.value)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}


@dataclass(frozen=True)
class ChannelMinimumBaseline(Baseline):
    """Per sample and per channel, the channel's minimum over the volume (background air in each MRI sequence)."""

    kind = "min"

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, inputs.dim()))
        return inputs.amin(dim=spatial, keepdim=True).expand_as(inputs).clone()


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return kernel.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class BlurredBaseline(Baseline):
    """The input blurred by a Gaussian of standard deviation ``sigma_voxels`` (in voxels), channel by channel.

    The blur is separable (one 1D convolution per spatial axis) with reflect padding (``d c b | a b c d``, scipy's
    ``mode="mirror"``) and a kernel truncated at ``int(3 sigma + 0.5)`` voxels (scipy's ``truncate=3``), so it equals
    ``scipy.ndimage.gaussian_filter(..., mode="mirror", truncate=3)``. Where an axis is shorter than the kernel, the
    kernel is truncated further to ``size - 1`` voxels (reflect padding cannot go further) and renormalised to sum
    to one. Axes of size one are left as they are.
    """

    sigma_voxels: float = 5.0
    kind = "blur"

    def __post_init__(self) -> None:
        s = self.sigma_voxels
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise SegExplainError(f"BlurredBaseline sigma_voxels must be a finite number > 0, got {s!r}")
        object.__setattr__(self, "sigma_voxels", float(s))

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = inputs.shape
        n_spatial = inputs.dim() - 2
        if n_spatial not in (1, 2, 3):
            raise SegExplainError(
                f"BlurredBaseline supports 1 to 3 spatial dimensions, got input shape {tuple(shape)}"
            )
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n_spatial]
        x = inputs.reshape((shape[0] * shape[1], 1) + tuple(shape[2:]))
        base_radius = int(3.0 * self.sigma_voxels + 0.5)
        for axis in range(n_spatial):
            size = x.shape[2 + axis]
            radius = min(base_radius, size - 1)
            if radius <= 0:
                continue
            kernel = _gaussian_kernel(self.sigma_voxels, radius, x.dtype, x.device)
            kshape = [1, 1] + [1] * n_spatial
            kshape[2 + axis] = 2 * radius + 1
            # F.pad lists pads from the last axis backwards.
            pads = [0, 0] * n_spatial
            pos = 2 * (n_spatial - 1 - axis)
            pads[pos] = pads[pos + 1] = radius
            x = conv(F.pad(x, tuple(pads), mode="reflect"), kernel.reshape(kshape))
        return x.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "sigma_voxels": self.sigma_voxels}


_SPEC_HELP = "expected 'zero', 'constant:VALUE', 'min', 'blur:SIGMA', a number or a Baseline"


def _parse_float(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SegExplainError(f"baseline spec {spec!r} has no valid number after ':'; {_SPEC_HELP}") from None


def make_baseline(spec: Any) -> Baseline:
    """Build a baseline from a command-line string, a number, a ``to_dict()`` dict, or return a Baseline as it is.

    Accepted strings (case-insensitive): ``"zero"`` (or ``"zeros"``), ``"constant:VALUE"``, ``"min"``,
    ``"blur"`` (sigma 5 voxels) or ``"blur:SIGMA"``. A plain number gives a :class:`ConstantBaseline`.
    """
    if isinstance(spec, Baseline):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantBaseline(float(spec))
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind == "zero":
            return ZeroBaseline()
        if kind == "constant" and "value" in spec:
            return ConstantBaseline(spec["value"])
        if kind == "min":
            return ChannelMinimumBaseline()
        if kind == "blur":
            return BlurredBaseline(spec.get("sigma_voxels", 5.0))
        raise SegExplainError(f"baseline dict {spec!r} is not valid; expected the output of Baseline.to_dict()")
    if not isinstance(spec, str):
        raise SegExplainError(f"baseline spec {spec!r} of type {type(spec).__name__} is not valid; {_SPEC_HELP}")
    text = spec.strip().lower()
    head, sep, tail = text.partition(":")
    if head in ("zero", "zeros") and not sep:
        return ZeroBaseline()
    if head in ("min", "minimum") and not sep:
        return ChannelMinimumBaseline()
    if head == "constant" and sep:
        return ConstantBaseline(_parse_float(tail, spec))
    if head == "blur":
        return BlurredBaseline(_parse_float(tail, spec) if sep else 5.0)
    raise SegExplainError(f"baseline spec {spec!r} is not valid; {_SPEC_HELP}")
