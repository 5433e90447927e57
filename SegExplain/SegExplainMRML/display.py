"""Relevance overlays on Slicer's slice views: a diverging colour table centred on zero, and live amplitude filters.

A relevance map is signed: red is evidence for the explained class, blue against, and near zero it is transparent so that
the anatomy shows through. The window is symmetric (level 0, width 2 max|R|), so zero is always the centre colour; all
sequences of one explanation share it (max|R| over all of them, :func:`sharedAmplitude`), so that a colour means the
same relevance in every sequence.

The filter sliders act post hoc on the finished map (Tjoa et al.'s alpha-pass and alpha-clamp, normalized per map by
max|R|): the relevance volumes themselves are never changed; the filtered map goes into one overlay volume per
explanation, which is what the slice views show. A 256x256x128 volume updates in about 50 ms on 2 CPU cores
(``bench/bench_overlay_filter.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
import torch

from SegExplainLib.engine.filters import AmplitudeFilter
from SegExplainLib.errors import SegExplainError

from .nodes import nodeLabel

#: Name (and singleton tag) of the colour table the module adds to the scene.
DIVERGING_COLOR_NAME = "SegExplainDiverging"
#: Relevance below this fraction of max|R| is transparent. Slicer's slice views draw every table entry whose alpha is
#: not zero opaque (at the overlay opacity), so a gradual fade would show as a pale haze around every relevant spot.
TRANSPARENT_BELOW = 0.04
#: ColorBrewer RdBu, reversed: blue for negative relevance, red for positive, from light (just above the transparent
#: band) to dark (at max|R|).
_ANCHORS = np.array([(-1.0, 5, 48, 97), (-0.5, 67, 147, 195), (-TRANSPARENT_BELOW, 146, 197, 222),
                     (TRANSPARENT_BELOW, 244, 165, 130), (0.5, 214, 96, 77), (1.0, 103, 0, 31)])
#: An odd number of entries puts relevance 0 on the centre entry exactly.
_ENTRIES = 257


def divergingColors(values: np.ndarray) -> np.ndarray:
    """RGBA in [0, 1] of the diverging table at normalized relevance ``values`` in [-1, 1]."""
    values = np.clip(np.asarray(values, dtype=float), -1.0, 1.0)
    rgb = np.stack([np.interp(values, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)], axis=-1) / 255.0
    alpha = (np.abs(values) >= TRANSPARENT_BELOW).astype(float)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def divergingColorNode(scene: Any) -> Any:
    """The module's diverging colour table in ``scene``, added on first use (one per scene, saved with it)."""
    existing = scene.GetSingletonNode(DIVERGING_COLOR_NAME, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(DIVERGING_COLOR_NAME)
    node.SetSingletonTag(DIVERGING_COLOR_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(_ENTRIES)
    node.SetDescription("SegExplain relevance: blue negative, transparent near zero, red positive")
    colors = divergingColors(np.linspace(-1.0, 1.0, _ENTRIES))
    for index, (red, green, blue, alpha) in enumerate(colors):
        node.SetColor(index, f"{np.linspace(-1, 1, _ENTRIES)[index]:+.3f}", red, green, blue, alpha)
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


def maximumAmplitude(volumeNode: Any) -> float:
    """max|R| of a relevance volume (1 for an all-zero map, so that the window stays valid)."""
    amplitude = float(np.abs(slicer.util.arrayFromVolume(volumeNode)).max())
    return amplitude if amplitude > 0 else 1.0


def sharedAmplitude(volumeNodes: list[Any]) -> float:
    """max|R| over the relevance volumes of one explanation: the window all of them are shown with."""
    return max(maximumAmplitude(node) for node in volumeNodes)


def setDivergingDisplay(volumeNode: Any, amplitude: float | None = None) -> Any:
    """Show a relevance volume with the diverging table and the window [-amplitude, amplitude] (default max|R|)."""
    volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(divergingColorNode(volumeNode.GetScene()).GetID())
    display.SetAutoWindowLevel(False)
    amplitude = maximumAmplitude(volumeNode) if amplitude is None else float(amplitude)
    display.SetWindowLevel(2.0 * amplitude, 0.0)
    display.SetInterpolate(False)
    return display


def checkedOpacity(opacity: Any) -> float:
    if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0.0 <= opacity <= 1.0:
        raise SegExplainError(f"overlay opacity must be a number in [0, 1], got {opacity!r}")
    return float(opacity)


def showOverlay(compositeNodes: list[Any], background: Any, overlay: Any, opacity: float = 0.6) -> None:
    """Put ``background`` (an input sequence) and ``overlay`` (a relevance volume) into slice views.

    Args:
        compositeNodes: The ``vtkMRMLSliceCompositeNode`` of each view, e.g. of Red, Yellow and Green.
        background: The volume shown under the overlay.
        overlay: The relevance (or filtered overlay) volume, displayed with :func:`setDivergingDisplay`.
        opacity: Foreground opacity in [0, 1].
    """
    opacity = checkedOpacity(opacity)  # before any view changes
    for composite in compositeNodes:
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(overlay.GetID() if overlay is not None else None)
    setOverlayOpacity(compositeNodes, opacity)


def setOverlayOpacity(compositeNodes: list[Any], opacity: float) -> None:
    """Set the foreground (relevance overlay) opacity of slice views, in [0, 1]."""
    opacity = checkedOpacity(opacity)
    for composite in compositeNodes:
        composite.SetForegroundOpacity(opacity)


def amplitudeFilter(kind: str, low: float, high: float) -> AmplitudeFilter | None:
    """The post-hoc filter of the sliders, or None when it keeps every voxel (pass or clamp over [0, 1])."""
    if kind not in ("none", "pass", "clamp"):
        raise SegExplainError(f"filter kind must be 'none', 'pass' or 'clamp', got {kind!r}")
    if kind == "none" or (low == 0.0 and high == 1.0):
        return None
    return AmplitudeFilter(kind, (low, high))


def updateFilteredOverlay(relevance: Any, overlay: Any, amplitude_filter: AmplitudeFilter | None) -> None:
    """Write the filtered relevance map into the overlay volume (same grid), leaving the relevance volume as it is.

    The overlay keeps the window of the unfiltered map, so that a clamp saturates colours and a pass filter blanks
    voxels, as in Tjoa et al.'s figures.
    """
    source = slicer.util.arrayFromVolume(relevance)
    target = slicer.util.arrayFromVolume(overlay)
    if target is None or target.shape != source.shape:
        raise SegExplainError(f"overlay {nodeLabel(overlay)} is not on the grid of {nodeLabel(relevance)}")
    if amplitude_filter is None:
        np.copyto(target, source)
    else:
        raw = torch.from_numpy(source)[None]
        torch.mul(raw, amplitude_filter.factor(raw, channel_dim=0), out=torch.from_numpy(target)[None])
    slicer.util.arrayFromVolumeModified(overlay)
