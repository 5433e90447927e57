"""How fast the module's filter sliders update a relevance overlay (target: under 100 ms for 256x256x128).

Builds a real MRML scene (slicer-core), a relevance volume of the given size with a heavy-tailed signed map, its
overlay volume and a slice view (vtkMRMLSliceLogic) showing it over a background, then times, per slider step:

- ``filter``: ``updateFilteredOverlay`` (the post-hoc alpha-pass / alpha-clamp written into the overlay volume), and
- ``filter + slice``: the same plus Slicer's slice pipeline producing the blended image of one 512x512 view.

Prints the median and worst of the timed steps and the ratio to the 100 ms target. Run from the repository root
after ``pip install -e ".[test]"``: ``python bench/bench_overlay_filter.py [--size 128 256 256] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import slicer
import torch
import vtk
from SegExplainMRML import display
from SegExplainMRML.export import sliceImage

TARGET_SECONDS = 0.100


def build_scene(shape: tuple[int, int, int]):
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.SetSliceLogics(vtk.vtkCollection())
    application.GetColorLogic().SetMRMLScene(scene)
    application.GetColorLogic().AddDefaultColorNodes()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    slicer.mrmlScene = scene
    rng = np.random.default_rng(0)
    relevance_array = (rng.standard_t(3, size=shape) * rng.random(shape) ** 4).astype(np.float32)
    volumes = []
    for name, array in (("background", rng.random(shape, dtype=np.float32)), ("relevance", relevance_array),
                        ("overlay", relevance_array.copy())):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        node.CreateDefaultDisplayNodes()
        volumes.append(node)
    background, relevance, overlay = volumes
    display.setDivergingDisplay(overlay, display.maximumAmplitude(relevance))
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(application)
    logic.SetMRMLScene(scene)
    logic.AddSliceNode("Red")
    logic.ResizeSliceNode(512, 512)
    display.showOverlay([logic.GetSliceCompositeNode()], background, overlay, 0.6)
    logic.FitSliceToBackground()
    # the caller keeps the application logic alive: the slice logic and the scene's nodes refer to it
    return relevance, overlay, logic, application


def time_steps(relevance, overlay, logic, kind: str, steps: int, with_slice: bool) -> list[float]:
    times = []
    for step in range(steps + 1):  # the first step warms up and is not counted
        low = 0.02 * (step % 10)
        amplitude_filter = display.amplitudeFilter(kind, low, 1.0 - low / 2)
        started = time.perf_counter()
        display.updateFilteredOverlay(relevance, overlay, amplitude_filter)
        if with_slice:
            sliceImage(logic)
        if step:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs=3, type=int, default=(128, 256, 256), metavar=("D", "H", "W"))
    parser.add_argument("--steps", type=int, default=20, help="timed slider steps per row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    relevance, overlay, logic, _application = build_scene(tuple(args.size))
    print(f"overlay filter update, volume {tuple(args.size)} (D, H, W), {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'filter':<8} {'what':<16} {'median ms':>10} {'worst ms':>9} {'median / 100 ms':>16}")
    for kind in ("pass", "clamp"):
        for with_slice in (False, True):
            times = time_steps(relevance, overlay, logic, kind, args.steps, with_slice)
            median = statistics.median(times)
            print(f"{kind:<8} {'filter + slice' if with_slice else 'filter':<16} {1000 * median:>10.1f} "
                  f"{1000 * max(times):>9.1f} {median / TARGET_SECONDS:>16.2f}")


if __name__ == "__main__":
    main()
