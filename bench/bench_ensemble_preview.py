"""A click on an nnU-Net ensemble in the warm worker: the preview (first fold, no mirroring), then the exact answer.

Per click, from the request to the preview's maps on the host, and to the exact ensemble's maps (same request, same
worker, as the Slicer module and the review app ask it). By default on a model made like the tests' fixture
(``Testing/nnunet_fixture.py``: nnunetv2's own planner and trainer, a tiny 3d_fullres network, ``--folds`` folds,
mirroring on three axes, so 8 mirrorings) and its 16x28x24 two-sequence case; ``--folder`` times any nnU-Net v2
results folder instead, on a synthetic case of ``--shape`` voxels at the plans' spacing. Prints the machine, every
click and the medians. Run from the repository root:

    python bench/bench_ensemble_preview.py [--folds 2] [--clicks 3] [--methods lrp,gradient] [--device cpu]
    python bench/bench_ensemble_preview.py --folder RESULTS/Dataset.../nnUNetTrainer__nnUNetPlans__3d_fullres \\
        --shape 128 128 128 --device cuda

On a GPU (``--device cuda``) the exact answer of a 5-fold 3d_fullres model should take seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def machine(device: str) -> str:
    import torch
    from _machine import cpu_model

    gpu = f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}, load average "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def fixture(root: Path, folds: int) -> Path:
    """The tests' nnU-Net model with ``folds`` folds, made by nnunetv2 in a child process (it reads its folders from
    environment variables when imported)."""
    subprocess.run([sys.executable, str(ROOT / "Testing" / "nnunet_fixture.py"), str(root),
                    *(str(f) for f in range(folds))], check=True, capture_output=True, timeout=1800)
    return root / "nnUNet_results" / "Dataset001_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"


def case(folder: Path, shape: tuple[int, ...] | None):
    """The tests' case (16x28x24, two sequences, a lesion) or noise of ``shape`` at the plans' spacing."""
    from SegExplainLib.io.imaging import Geometry

    if shape is None:
        sys.path.insert(0, str(ROOT / "Testing" / "SegExplainLib"))
        from test_nnunet import _case

        return _case((16, 28, 24))
    plans = json.loads((folder / "plans.json").read_text())
    channels = len(json.loads((folder / "dataset.json").read_text())["channel_names"])
    spacing = plans["configurations"]["3d_fullres"]["spacing"]  # (z, y, x)
    image = np.random.default_rng(0).normal(200.0, 15.0, (channels, *shape)).astype(np.float32)
    geometry = Geometry(spacing=tuple(reversed(spacing)), origin=(0.0, 0.0, 0.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), size=tuple(reversed(shape)))
    return image, geometry, tuple(n // 2 for n in shape)


def bench(folder: Path, folds: list[str], methods: list[str], clicks: int, device: str,
          shape: tuple[int, ...] | None) -> dict[str, dict[str, list[float]]]:
    from SegExplainLib.application.model_source import ModelSource
    from SegExplainLib.application.requests import ExplainRequest
    from SegExplainLib.frontends.worker import Worker

    image, geometry, centre = case(folder, shape)
    times: dict[str, dict[str, list[float]]] = {}
    with Worker(ModelSource("nnunet", str(folder), folds=tuple(folds or ()))) as worker:
        worker.start()
        started = time.perf_counter()
        prepared = worker.wait(worker.set_case(image, geometry), timeout=3600)
        print(f"  model loaded, case {image.shape} prepared (network grid {prepared.record['network_shape']}, the "
              f"ensemble's and the preview's whole-volume predictions): {time.perf_counter() - started:.1f} s",
              flush=True)
        for method in methods:
            times[method] = {"preview": [], "exact": []}
            for index in range(clicks + 1):  # the first click warms the method up
                voxel = (centre[0], centre[1] + index % 3 - 1, centre[2])
                started = time.perf_counter()
                request = worker.explain(ExplainRequest(voxel=voxel, method=method, device=device, preview=True))
                while worker.preview(request) is None and worker.answer(request) is None:
                    worker.poll(0.01)
                preview = time.perf_counter() - started
                answer = worker.wait(request)
                exact = time.perf_counter() - started
                if worker.preview(request) is None:
                    raise SystemExit(f"the model has no preview: {answer.record.get('ensemble')}")
                label = "warm-up" if index == 0 else f"click {index}"
                print(f"  {method} {label}: preview {preview:.2f} s, exact {exact:.2f} s "
                      f"({answer.record['ensemble']})", flush=True)
                if index:
                    times[method]["preview"].append(preview)
                    times[method]["exact"].append(exact)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an nnU-Net v2 results folder (default: the tests' model)")
    parser.add_argument("--folds", type=int, default=2, help="folds of the tests' model, or the first N of --folder")
    parser.add_argument("--shape", type=int, nargs=3, help="case shape (D H W) for --folder (default: the tests')")
    parser.add_argument("--methods", default="lrp,gradient")
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(machine(args.device), flush=True)
    with tempfile.TemporaryDirectory(prefix="segexplain-preview-") as scratch:
        if args.folder is None:
            started = time.perf_counter()
            folder = fixture(Path(scratch), args.folds)
            print(f"  the tests' model with {args.folds} folds, trained in {time.perf_counter() - started:.0f} s",
                  flush=True)
            folds = []
        else:
            folder, folds = args.folder, [str(f) for f in range(args.folds)]
        times = bench(folder, folds, args.methods.split(","), args.clicks, args.device,
                      None if args.shape is None else tuple(args.shape))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| method | preview (median) | exact ensemble (median) | ratio |")
    print("| --- | --- | --- | --- |")
    for method, runs in times.items():
        preview, exact = statistics.median(runs["preview"]), statistics.median(runs["exact"])
        print(f"| {method} | {preview:.2f} s | {exact:.2f} s | {exact / preview:.1f}x |")


if __name__ == "__main__":
    main()
