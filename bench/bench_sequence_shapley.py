#!/usr/bin/env python
"""Benchmark: exact per-sequence Shapley values of 6 MRI sequences through a sliding window, for a small region.

``sequence_shapley`` scores all 2^6 = 64 coalitions of the sequences. It is seed-local, so through a
:class:`SegExplainLib.models.sliding.SlidingWindow` every coalition runs only the windows that reach the region. This
script counts the window passes the network really runs (a hook on the network adds up the batch rows it sees) and
times the explanation against the whole-volume one (the same window inside a plain ``nn.Sequential``, which is no
``RegionalModel``, so every window runs), and checks that the values agree.

Set-up: ``UNet3D(in_channels=6, out_channels=2, base_channels=4, depth=3)`` (seeded, eval), 6 sequences of shape
(D, H, W) = (32, 96, 96), patch (16, 48, 48), overlap 0.5: 27 windows. The region is a 3 x 6 x 6 box at (2, 10, 10),
inside one window (``--quick``: 9 windows, the region in one). After one warm-up explanation, the two are timed
``--repeats`` times, interleaved, and the best of each is printed, in wall-clock and CPU seconds, with the machine,
thread count, torch version and the load average.

Run from the repository root::

    python bench/bench_sequence_shapley.py            # the case above (minutes on 2 busy CPU cores)
    python bench/bench_sequence_shapley.py --quick    # (16, 64, 64) with patch (16, 32, 32): 9 windows
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
from SegExplainLib.engine.targets import BoxTarget  # noqa: E402
from SegExplainLib.models.networks import UNet3D  # noqa: E402
from SegExplainLib.models.sliding import SlidingWindow  # noqa: E402

CASES = {"full": ((32, 96, 96), (16, 48, 48)), "quick": ((16, 64, 64), (16, 32, 32))}
SEQUENCES = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small case: (16, 64, 64), patch (16, 32, 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is printed (default 2)")
    parser.add_argument("--internal-batch-size", type=int, default=2, help=(
        "coalitions per pass (default 2, the CPU's best); 0: the automatic choice, whose memory probe adds one "
        "forward and backward pass of the region's windows"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume, patch = CASES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    net = UNet3D(in_channels=SEQUENCES, out_channels=2, base_channels=4, depth=3).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    rows = [0]
    net.register_forward_hook(lambda _module, inputs, _output: rows.__setitem__(0, rows[0] + inputs[0].shape[0]))
    window = SlidingWindow(net, patch, overlap=0.5)
    image = np.random.default_rng(0).standard_normal((SEQUENCES, *volume)).astype(np.float32)
    target = BoxTarget((2, 10, 10), (5, 16, 16), class_index=1)

    def timed(model: nn.Module):
        rows[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        result = explain(model, image, target, "sequence_shapley", device="cpu",
                         internal_batch_size=args.internal_batch_size or None)
        return (time.perf_counter() - wall, time.process_time() - cpu), rows[0], result

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads; torch {torch.__version__}; "
          f"load average (1 min) {os.getloadavg()[0]:.2f}")
    print(f"{SEQUENCES} sequences {volume}, patch {patch}, overlap 0.5, region {target.start}-{target.stop}; "
          f"UNet3D base 4, depth 3, {SEQUENCES} -> 2; {2**SEQUENCES} coalitions")
    timed(window)  # warm-up: first-call costs leave the timings
    region_times, whole_times = [], []
    for _ in range(args.repeats):  # interleaved, so that load changes on a shared machine hit both alike
        seconds, region_rows, region = timed(window)
        region_times.append(seconds)
        seconds, whole_rows, whole = timed(nn.Sequential(window))  # no RegionalModel: every window
        whole_times.append(seconds)
    reached, total = region.extras["windows_run"], region.extras["windows_total"]
    # explain()'s own first pass (the target's score) runs the same windows once more than the coalitions (and the
    # automatic batch choice's probe once more)
    method_rows = region_rows - reached
    print(f"windows reaching the region: {reached} of {total}")
    print(f"window passes of the coalitions: {method_rows} = {method_rows // reached} x {reached} "
          f"(whole volume: {whole_rows - total} = {(whole_rows - total) // total} x {total}); "
          f"with explain()'s first pass: {region_rows} and {whole_rows}")
    values = np.asarray(region.extras["values"][0])
    difference = float(np.abs(values - np.asarray(whole.extras["values"][0])).max()) / float(np.abs(values).max())
    print(f"values {np.round(values, 4).tolist()}, relative delta {region.relative_delta:.1e}, "
          f"max rel. difference to the whole volume {difference:.1e}")
    for clock in (0, 1):
        region_seconds = min(t[clock] for t in region_times)
        whole_seconds = min(t[clock] for t in whole_times)
        print(f"{('wall', 'CPU')[clock]:>5}: region {region_seconds:.2f} s, whole volume {whole_seconds:.2f} s, "
              f"{whole_seconds / region_seconds:.2f}x", flush=True)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
