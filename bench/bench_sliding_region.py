#!/usr/bin/env python
"""Benchmark: a click explained through a sliding window, running only the windows that reach it vs all windows.

A network trained on patches is explained on the whole volume through :class:`SegExplainLib.models.sliding.SlidingWindow`.
For a click, ``explain`` runs only the windows whose patch overlaps the click's bounding box, in the first forward
pass and in every pass of the method. This script times that against the whole-volume explanation (the same window
inside a plain ``nn.Sequential``, which is no ``RegionalModel``, so every window runs) for LRP and the gradient, and
checks that the maps agree.

Set-up: ``UNet3D(in_channels=1, out_channels=2, base_channels=4, depth=3)`` (BatchNorm, ReLU, seeded, eval), one
MRI sequence of shape (D, H, W) = (128, 256, 256), patch (64, 128, 128), overlap 0.5: 27 windows. The click is the
centre voxel (radius 0), which lies in 2 patches per axis: 8 windows. After one warm-up explanation, the two are
timed ``--repeats`` times, interleaved, and the best of each is printed, in wall-clock seconds and in CPU seconds of
this process (less sensitive to other processes on a shared machine), with the machine, thread count, torch version
and the load average.

Run from the repository root::

    python bench/bench_sliding_region.py            # the full case (5 to 15 minutes on 2 busy CPU cores)
    python bench/bench_sliding_region.py --quick    # (32, 64, 64) with patch (16, 32, 32): seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _machine import cpu_model  # noqa: E402 - bench/, the script's folder

from SegExplainLib.engine.api import explain  # noqa: E402
from SegExplainLib.engine.targets import VoxelTarget  # noqa: E402
from SegExplainLib.models.networks import UNet3D  # noqa: E402
from SegExplainLib.models.sliding import SlidingWindow  # noqa: E402

CASES = {"full": ((128, 256, 256), (64, 128, 128)), "quick": ((32, 64, 64), (16, 32, 32))}
METHODS = {"lrp": {"composite": "epsilon_plus"}, "gradient": {}}


def build(patch: tuple[int, ...]) -> SlidingWindow:
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, out_channels=2, base_channels=4, depth=3).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return SlidingWindow(net, patch, overlap=0.5)


def timed(model: nn.Module, image: np.ndarray, target: VoxelTarget, method: str):
    """Wall-clock and CPU seconds of one explanation (CPU time: of this process, all threads), and the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = explain(model, image, target, method, device="cpu", **METHODS[method])
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small case: (32, 64, 64), patch (16, 32, 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--methods", default="lrp,gradient", help="comma-separated, of: lrp, gradient")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is printed (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume, patch = CASES["quick" if args.quick else "full"]
    window = build(patch)
    image = np.random.default_rng(0).standard_normal((1, *volume)).astype(np.float32)
    target = VoxelTarget(tuple(v // 2 for v in volume), class_index=1)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads; torch {torch.__version__}; "
          f"load average (1 min) {os.getloadavg()[0]:.2f}")
    print(f"volume {volume}, patch {patch}, overlap 0.5, click {target.index}; UNet3D base 4, depth 3, 1 -> 2")
    print(f"{'method':<10} {'clock':>5} {'windows run':>12} {'region s':>10} {'whole s':>10} {'speed-up':>9} {'max rel. diff':>14}")
    for method in args.methods.split(","):
        timed(window, image, target, method)  # warm-up: first-call costs leave the timings
        region_times, whole_times = [], []
        for _ in range(args.repeats):  # interleaved, so that load changes on a shared machine hit both alike
            seconds, region = timed(window, image, target, method)
            region_times.append(seconds)
            seconds, whole = timed(nn.Sequential(window), image, target, method)  # no RegionalModel: all windows
            whole_times.append(seconds)
        scale = float(np.abs(whole.maps).max()) or 1.0
        difference = float(np.abs(region.maps - whole.maps).max()) / scale
        windows = f"{region.extras['windows_run']} of {region.extras['windows_total']}"
        for clock in (0, 1):
            region_seconds = min(t[clock] for t in region_times)
            whole_seconds = min(t[clock] for t in whole_times)
            print(f"{method:<10} {('wall', 'CPU')[clock]:>5} {windows:>12} {region_seconds:>10.1f} "
                  f"{whole_seconds:>10.1f} {whole_seconds / region_seconds:>8.2f}x {difference:>14.1e}", flush=True)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
