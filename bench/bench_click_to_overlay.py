"""Click to overlay with the warm worker, on the demo case (24x48x48, 6 sequences, LRP of a 2 mm ball): target 1 s.

(a) MRML: a real scene (slicer-core) holding the demo case; per click, the clicked point's region, the worker's
    answer, the explanation folder loaded into the scene and the overlay volume filled by ``showExplanation``.
(b) Browser: ``segexplain review`` serving the demo case and headless Chromium (the review tests' DevTools driver);
    per click, from the mouse event on the axial view until the page has the new explanation and the view has
    received a new image.

The worker is warm in both (model and case loaded before the first timed click; one untimed warm-up click). Prints
the machine, torch's version, the load average, every click (with the worker's torch threads) and the median. Run
from the repository root: ``python bench/bench_click_to_overlay.py [--clicks 7] [--no-browser] [--load N]``.

``--load N`` runs N processes that each keep a core busy during both parts (a shared machine's other jobs), after
letting the one-minute load average rise for ``--load-wait`` seconds (default 60), from which the worker chooses its
threads.

``--size 128 --device cuda --no-browser`` times part (a) on a 128^3 case instead (the demo case resampled, six
sequences), whose target on a GPU is 0.3 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "SegExplain"), str(ROOT / "Testing" / "SegExplain"),
                str(ROOT / "Testing" / "SegExplainReview")]
TARGET_SECONDS = 1.0


def machine() -> str:
    import torch
    from _machine import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def clickPoints(volume, count: int) -> list[tuple[float, float, float]]:
    """RAS points around the volume's centre (the demo lesion's), one per click."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    centre = [n / 2 for n in volume.GetImageData().GetDimensions()]
    rng = np.random.default_rng(0)
    return [tuple(matrix.MultiplyPoint((centre[0] + rng.integers(-4, 5), centre[1] + rng.integers(-4, 5), centre[2],
                                        1.0))[:3]) for _ in range(count)]


def addCase(scene, size: int | None):
    """The demo case, or the demo case resampled to ``size``^3 voxels (linear, per sequence)."""
    from mrml_scene import addDemoCase, addVolume
    from scipy.ndimage import zoom

    from SegExplainLib.application.demo import SEQUENCE_NAMES, make_case

    if size is None:
        return addDemoCase(scene)[0]
    image, _ = make_case(1000)
    return [addVolume(scene, zoom(channel, [size / n for n in channel.shape], order=1), name=name)
            for channel, name in zip(image, SEQUENCE_NAMES)]


def benchMrml(clicks: int, *, size: int | None = None, device: str = "auto") -> list[float]:
    import slicer
    from mrml_scene import wiredScene
    from SegExplainMRML import workflow
    from SegExplainMRML.job import ExplainSettings, WarmExplainer

    from SegExplainLib.application.model_source import ModelSource

    scene = wiredScene()
    slicer.mrmlScene = scene
    volumes = addCase(scene, size)
    names = [v.GetName() for v in volumes]
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    parameters = ExplainSettings(device=device)
    controls = type("Controls", (), {"regionKind": "point", "radius": 2.0, "displayedSequence": 0,
                                     "filterKind": "none", "filterLow": 0.0, "filterHigh": 1.0,
                                     "overlayOpacity": 0.6})()
    explainer = WarmExplainer()
    workflow.prepareExplanation(explainer, volumes, names, None)
    seconds = []
    try:
        for index, point in enumerate(clickPoints(volumes[0], clicks + 1)):
            points.AddControlPoint(point)
            started = time.perf_counter()
            run = workflow.startExplanation(explainer, volumes, names, workflow.region(controls, volumes[0],
                                            clickedPoints=points), parameters, ModelSource())
            if run.wait(300) != "done":
                raise RuntimeError(run.error)
            explanation = workflow.finishExplanation(run, volumes)
            workflow.showExplanation(explanation, controls, [])
            elapsed = time.perf_counter() - started
            assert slicer.util.arrayFromVolume(explanation.overlay).any()
            if index:  # the first click also waits for the model and the case
                seconds.append(elapsed)
                print(f"  (a) click {index}: {elapsed:.3f} s (worker {run.answer.seconds:.3f} s, "
                      f"{run.answer.record['torch_threads']} torch threads)", flush=True)
        assert explainer.worker.starts == 1
    finally:
        explainer.close()
    return seconds


def benchBrowser(clicks: int) -> list[float]:
    import importlib.util

    from cdp import Chromium

    # the review tests' server launcher (their conftest shares its module name with the module tests')
    spec = importlib.util.spec_from_file_location("review_conftest", ROOT / "Testing" / "SegExplainReview" / "conftest.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    server = launcher.Server()
    seconds = []
    try:
        with Chromium() as page:
            page.navigate(server.url)
            page.waitFor("document.querySelectorAll('.layout-grid-item img.image-display-area').length >= 4 && "
                         "window.trame && window.trame.state.get('sequences').length === 6", timeout=120)
            rect = page.evaluate("(() => { const r = document.querySelectorAll('.layout-grid-item')[0]"
                                 ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
            rng = np.random.default_rng(0)
            image = "document.querySelectorAll('.layout-grid-item img.image-display-area')[0].src"
            for index in range(clicks + 1):
                before = page.evaluate("window.trame.state.get('current')")
                source = page.evaluate(image)
                x, y = (rect[0] + rect[2] * (0.5 + rng.uniform(-0.05, 0.05)),
                        rect[1] + rect[3] * (0.5 + rng.uniform(-0.05, 0.05)))
                page.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
                time.sleep(0.3)  # the remote view learns the pointer position from the move, as the tests do
                started = time.perf_counter()  # the press is the click
                for kind in ("mousePressed", "mouseReleased"):
                    page.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                           "clickCount": 1})
                page.waitFor(f"(window.trame.state.get('current') !== {before if before is not None else 'null'} "
                             f"&& !window.trame.state.get('running') && {image} !== {source!r}) || "
                             "window.trame.state.get('error')", timeout=300, interval=0.01)
                elapsed = time.perf_counter() - started
                error = page.evaluate("window.trame.state.get('error')")
                if error:
                    raise RuntimeError(error)
                if index:
                    seconds.append(elapsed)
                    print(f"  (b) click {index}: {elapsed:.3f} s", flush=True)
    finally:
        server.stop()
    return seconds


@contextlib.contextmanager
def busyProcesses(count: int, wait: float):
    """``count`` processes that each spin on a core until the block ends, started ``wait`` seconds before it."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(wait if count else 0.0)
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=7, help="timed clicks of each part (after one warm-up click)")
    parser.add_argument("--no-browser", action="store_true", help="skip part (b)")
    parser.add_argument("--size", type=int, help="part (a) on the demo case resampled to SIZE^3 voxels")
    parser.add_argument("--device", default="auto", help="the worker's device: auto, cpu or cuda")
    parser.add_argument("--load", type=int, default=0, help="busy processes running during the timed clicks")
    parser.add_argument("--load-wait", type=float, default=60.0, help="seconds the busy processes run before")
    args = parser.parse_args()
    if args.load < 0 or args.load_wait < 0:
        parser.error(f"--load and --load-wait must be at least 0, got {args.load} and {args.load_wait}")
    if args.size is not None and not args.no_browser:
        parser.error("--size times part (a) only: add --no-browser")
    target = 0.3 if args.device.startswith("cuda") else TARGET_SECONDS
    with busyProcesses(args.load, args.load_wait):
        print(f"machine: {machine()}; {args.load} busy processes", flush=True)
        rows = [("(a) MRML: region -> overlay volume filled",
                 benchMrml(args.clicks, size=args.size, device=args.device))]
        if not args.no_browser:
            rows.append(("(b) browser: click -> overlay shown", benchBrowser(args.clicks)))
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for name, seconds in rows:
        median = statistics.median(seconds)
        print(f"{name}: median {median:.3f} s, min {min(seconds):.3f} s, max {max(seconds):.3f} s over "
              f"{len(seconds)} clicks; target {target:.1f} s: {'PASS' if median < target else 'FAIL'}")


if __name__ == "__main__":
    main()
