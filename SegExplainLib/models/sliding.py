"""Sliding-window inference as a module, so that every explanation method sees the whole-volume network.

Networks trained on patches (nnU-Net style) are run on overlapping patches whose logits are blended with a Gaussian
weight. :class:`SlidingWindow` does this inside ``forward`` with operations LRP propagates exactly: slicing the
input (a copy), the network, a product with a constant weight, and sums into the output. Relevance of a voxel seen by
several patches is therefore the blend of what each patch's network saw.

The logits inside a region come only from the windows that overlap the region's bounding box. Within
:meth:`SlidingWindow.restricted_to` only those windows run; :func:`~SegExplainLib.explain` uses this for every pass of
an explanation whose method allows it (see :class:`~SegExplainLib.engine.regional.RegionalModel`), so a click costs a few windows, not the volume.

Example:
    >>> whole = SlidingWindow(unet, patch_size=(32, 96, 96), overlap=0.5)
    >>> explain(whole, image, PredictedRegion(class_index=1), "lrp")
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.regional import Bounds
from ..errors import SegExplainError

#: ``(spatial_shape, patch_size) -> per-axis lists of patch starts``, e.g. nnU-Net's step computation wrapped.
Positions = Callable[[tuple[int, ...], tuple[int, ...]], Sequence[Sequence[int]]]
#: How :class:`SlidingWindow` may pad a volume smaller than its patch (``torch.nn.functional.pad``'s modes).
PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _starts(size: int, patch: int, step: int) -> list[int]:
    """Patch starts covering ``[0, size)``; the last patch is aligned to the end."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, step))
    return [*starts, size - patch]


def _fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A content hash of tensors (bytes, shapes, dtypes): the same numbers on another device hash the same."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype};".encode())
        digest.update(tensor.detach().contiguous().flatten().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class SlidingWindow(nn.Module):
    """Run ``network`` on overlapping patches and blend their logits with a weight (a Gaussian by default).

    The defaults are this module's own scheme; ``positions``, ``weight``, ``pad_to_patch`` (with ``pad_mode`` and
    ``pad_value``) and ``batch_size`` reproduce a framework's sliding window instead, e.g. nnU-Net's
    (``compute_steps_for_sliding_window``, ``compute_gaussian``, ``pad_nd_image``) or MONAI's ``SlidingWindowInferer``
    (see :mod:`SegExplainLib.models.monai_bundle`).

    Args:
        network: A segmentation network returning logits of its input's spatial size.
        patch_size: Spatial patch size (D, H, W); axes of the volume smaller than the patch are taken whole unless
            ``pad_to_patch``.
        overlap: Fraction of a patch shared with its neighbour, in [0, 1).
        sigma_scale: Standard deviation of the Gaussian weight as a fraction of the patch size.
        positions: Replaces the patch starts computed from ``overlap``: called with the (padded) volume's spatial
            shape and the patch size, returns one list of starts per axis; the patches must cover the volume.
        weight: Replaces the Gaussian: a fixed importance map of shape ``patch_size``, positive everywhere (the blend
            divides by the summed weights). Volumes smaller than the patch then need ``pad_to_patch``.
        pad_to_patch: Pad axes smaller than the patch to the patch size, split as nnU-Net's ``pad_nd_image`` and
            MONAI's ``sliding_window_inference`` do (half the difference, rounded down, before), and crop the output
            back. Relevance of padded voxels goes where the padding copied them from (none for ``"constant"``).
        pad_mode: How ``pad_to_patch`` fills: ``"constant"`` (with ``pad_value``), ``"reflect"``, ``"replicate"`` or
            ``"circular"`` (``torch.nn.functional.pad``'s modes).
        pad_value: The value of ``"constant"`` padding.
        batch_size: Windows per call of the network (their inputs concatenated along the batch axis), as MONAI's
            ``sw_batch_size``; the logits are the same, the memory of a call grows with it.

    Example:
        >>> from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
        >>> whole = SlidingWindow(net, patch, positions=lambda shape, p: compute_steps_for_sliding_window(shape, p, 0.5),
        ...                       weight=compute_gaussian(patch, sigma_scale=1 / 8), pad_to_patch=True)
    """

    def __init__(self, network: nn.Module, patch_size: Sequence[int], *, overlap: float = 0.5,
                 sigma_scale: float = 0.125, positions: Positions | None = None,
                 weight: torch.Tensor | None = None, pad_to_patch: bool = False, pad_mode: str = "constant",
                 pad_value: float = 0.0, batch_size: int = 1) -> None:
        super().__init__()
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            msg = f"patch_size must be three positive integers (D, H, W), got {tuple(patch_size)!r}"
            raise SegExplainError(msg)
        if not 0.0 <= overlap < 1.0:
            msg = f"overlap must lie in [0, 1), got {overlap!r}"
            raise SegExplainError(msg)
        if not sigma_scale > 0:
            msg = f"sigma_scale must be positive, got {sigma_scale!r}"
            raise SegExplainError(msg)
        if positions is not None and not callable(positions):
            msg = f"positions must be a callable (spatial_shape, patch_size) -> starts per axis, got {positions!r}"
            raise SegExplainError(msg)
        if not isinstance(pad_to_patch, bool):
            msg = f"pad_to_patch must be True or False, got {pad_to_patch!r}"
            raise SegExplainError(msg)
        if pad_mode not in PAD_MODES:
            msg = f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}"
            raise SegExplainError(msg)
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not math.isfinite(pad_value):
            msg = f"pad_value must be a finite number, got {pad_value!r}"
            raise SegExplainError(msg)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be a positive integer, got {batch_size!r}"
            raise SegExplainError(msg)
        self.network, self.patch_size, self.overlap, self.sigma_scale = network, patch, overlap, sigma_scale
        self.positions, self.pad_to_patch, self.pad_mode, self.pad_value = positions, pad_to_patch, pad_mode, pad_value
        self.batch_size = batch_size
        self.fixed_weight = None if weight is None else _checked_weight(weight, patch)
        self._bounds: Bounds | None = None
        self._record: dict[str, int] = {}
        self._prediction: tuple[str, torch.Tensor] | None = None

    def _gaussian(self, patch: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        axes = []
        for size in patch:
            centre = (size - 1) / 2
            sigma = max(size * self.sigma_scale, 1e-3)
            coordinates = torch.arange(size, dtype=like.dtype, device=like.device)
            axes.append(torch.exp(-0.5 * ((coordinates - centre) / sigma) ** 2))
        weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        return (weight / weight.max()).clamp(min=1e-3)  # no voxel with zero weight

    def _blend_weight(self, patch: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.fixed_weight is None:
            return self._gaussian(patch, like)
        if patch != self.patch_size:
            msg = (f"the volume {tuple(like.shape[2:])} is smaller than patch_size {self.patch_size} on some axis; "
                   "a fixed weight needs pad_to_patch=True")
            raise SegExplainError(msg)
        return self.fixed_weight.to(dtype=like.dtype, device=like.device)

    def _axis_starts(self, grid: tuple[int, ...], patch: tuple[int, ...]) -> list[list[int]]:
        if self.positions is None:
            steps = [max(1, int(p * (1 - self.overlap))) for p in patch]
            return [_starts(s, p, st) for s, p, st in zip(grid, patch, steps)]
        starts = self.positions(grid, patch)
        problem = _uncovered(starts, grid, patch)
        if problem:
            msg = f"positions returned {starts!r} for a volume {grid} and patch {patch}: {problem}"
            raise SegExplainError(msg)
        return [[operator.index(a) for a in axis] for axis in starts]

    @contextlib.contextmanager
    def restricted_to(self, bounds: Bounds | None) -> Iterator[dict[str, int]]:
        """Within the block, ``forward`` runs only the windows that overlap ``bounds``.

        The output inside ``bounds`` is then exactly that of the whole run: a voxel gets logits only from windows
        that contain it, and the blend is normalized by the weights of all windows. Outside ``bounds`` the output is
        zero or partial and must not be read.

        Args:
            bounds: ``(start, stop)`` per spatial axis on the output grid, e.g. a region's bounding box; ``None``
                runs every window.

        Yields:
            A dict updated by every forward pass: ``windows_run`` and ``windows_total``.
        """
        checked = None if bounds is None else _checked_bounds(bounds)
        previous = self._bounds, self._record
        self._bounds, self._record = checked, {}
        try:
            yield self._record
        finally:
            self._bounds, self._record = previous

    def whole_volume(self, x: torch.Tensor) -> torch.Tensor:
        """The unrestricted output for ``x``, without gradient; computed once and reused while nothing changed.

        The stored output is keyed by a content hash of ``x``, of the network's parameters and buffers, of this
        module's options and of the modules' train/eval flags, so it is never returned for another input or state
        (hashing costs one pass over the input and the parameters, a small fraction of a whole-volume run). It
        lets several explanations of a :class:`~SegExplainLib.engine.targets.PredictedRegion` of one case read the
        prediction from one whole-volume run. One output is kept; it is detached. It moves with the module (``.to``,
        ``.cuda``), and the key holds no device: the output stored before :func:`~SegExplainLib.explain` copies the
        model to a GPU serves the copy (a warm worker predicts each case once).
        """
        options = [] if self.fixed_weight is None else [self.fixed_weight]
        key = _fingerprint([x, *self.network.state_dict().values(), *options]) + repr(
            (self.patch_size, self.overlap, self.sigma_scale, self.positions, self.pad_to_patch, self.pad_mode,
             self.pad_value, self.batch_size, [m.training for m in self.modules()]))
        if self._prediction is None or self._prediction[0] != key:
            with torch.no_grad(), self.restricted_to(None):
                self._prediction = key, self(x)
        return self._prediction[1]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SlidingWindow:
        module = super()._apply(fn, recurse)
        if self._prediction is not None:  # the stored output goes where the parameters go
            self._prediction = self._prediction[0], fn(self._prediction[1])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented in the class
        spatial = tuple(x.shape[2:])
        below = [(p - s) // 2 if self.pad_to_patch and s < p else 0 for p, s in zip(self.patch_size, spatial)]
        above = [max(p - s, 0) - b if self.pad_to_patch else 0 for p, s, b in zip(self.patch_size, spatial, below)]
        if any(below) or any(above):
            padding = [v for b, a in zip(reversed(below), reversed(above)) for v in (b, a)]
            x = nn.functional.pad(x, padding, mode=self.pad_mode,
                                  **({"value": self.pad_value} if self.pad_mode == "constant" else {}))
        grid = tuple(x.shape[2:])
        patch = tuple(min(p, s) for p, s in zip(self.patch_size, grid))
        weight = self._blend_weight(patch, x)
        windows = [tuple(slice(a, a + p) for a, p in zip(start, patch))
                   for start in itertools.product(*self._axis_starts(grid, patch))]
        # every window's weight, run or not: a voxel of the bounds gets the whole run's value, and one outside
        # them a finite one (no 0 / 0 whose NaN the backward pass would carry into the maps)
        total = torch.zeros(grid, dtype=x.dtype, device=x.device)
        for window in windows:
            total[window] += weight
        run = windows if self._bounds is None else _meeting(windows, self._bounds, spatial, below)
        self._record.update(windows_run=len(run), windows_total=len(windows))
        output, batch = None, x.shape[0]
        for first in range(0, len(run), self.batch_size):
            group = run[first:first + self.batch_size]
            inputs = [x[(slice(None), slice(None), *window)] for window in group]
            logits = self.network(inputs[0] if len(inputs) == 1 else torch.cat(inputs))
            if output is None:
                output = x.new_zeros((batch, logits.shape[1], *grid))
            for index, window in enumerate(group):
                padding = [value for w, s in zip(reversed(window), reversed(grid)) for value in (w.start, s - w.stop)]
                output = output + nn.functional.pad(logits[index * batch:(index + 1) * batch] * weight, padding)
        output = output / total
        return output[(slice(None), slice(None), *(slice(b, b + s) for b, s in zip(below, spatial)))]


def _checked_weight(weight: Any, patch: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.as_tensor(weight).detach()
    if tuple(tensor.shape) != patch:
        msg = f"weight must have the patch shape {patch}, got shape {tuple(tensor.shape)}"
        raise SegExplainError(msg)
    if not tensor.is_floating_point():
        msg = f"weight must be floating point, got dtype {tensor.dtype}"
        raise SegExplainError(msg)
    if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
        msg = (f"weight must be positive and finite everywhere (the blend divides by the summed weights), got values "
               f"from {float(tensor.min())} to {float(tensor.max())}")
        raise SegExplainError(msg)
    return tensor.clone()


def _uncovered(starts: Any, grid: tuple[int, ...], patch: tuple[int, ...]) -> str | None:
    """What is wrong with per-axis patch starts for ``grid``, or ``None`` when the patches cover it."""
    if not isinstance(starts, Sequence) or len(starts) != len(grid):
        return f"expected one list of starts per axis ({len(grid)})"
    for axis, (values, size, width) in enumerate(zip(starts, grid, patch)):
        try:
            integers = [operator.index(a) for a in values]
        except TypeError:
            integers = []
        if not integers:
            return f"axis {axis} needs a non-empty list of integers"
        covered = torch.zeros(size, dtype=torch.bool)
        for a in integers:
            if not 0 <= a <= size - width:
                return f"start {a} on axis {axis} puts the patch outside [0, {size})"
            covered[a:a + width] = True
        if not bool(covered.all()):
            return f"voxel {int((~covered).nonzero()[0])} on axis {axis} lies in no patch"
    return None


def _checked_bounds(bounds: Any) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(a), int(b)) for a, b in bounds)
    except (TypeError, ValueError):
        pairs = ()
    if len(pairs) != 3 or any(not 0 <= a < b for a, b in pairs):
        msg = f"bounds must be three (start, stop) pairs with 0 <= start < stop, got {bounds!r}"
        raise SegExplainError(msg)
    return pairs


def _meeting(windows: list[tuple[slice, ...]], bounds: Bounds, spatial: tuple[int, ...],
             below: list[int]) -> list[tuple[slice, ...]]:
    """The windows (in padded coordinates) that overlap ``bounds`` (on the unpadded grid ``spatial``)."""
    if any(b > s for (_, b), s in zip(bounds, spatial)):
        msg = f"bounds {list(bounds)} reach outside the volume {spatial}"
        raise SegExplainError(msg)
    shifted = [(a + p, b + p) for (a, b), p in zip(bounds, below)]
    return [window for window in windows
            if all(w.start < b and w.stop > a for w, (a, b) in zip(window, shifted))]
