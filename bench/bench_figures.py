#!/usr/bin/env python
"""Benchmark: drawing and writing a case's figures (``mip.png``, ``montage.png``, ``shares.png``), old way vs new.

- old: the way ``segexplain explain`` and the cohort drew them before issue 19 (``case_figures``):
  ``mip_figure``, ``montage_figure`` (8 evenly spaced slices) and ``shares_figure`` of the positive shares, each
  written with ``save_figure``;
- new: ``explanation_figures`` (one picture per figure, laid out in pixels; titles, orientation letters, mm labels),
  each written with ``save_figure``.

The case is a synthetic one: six sequences of a smooth ellipsoid "head" with noise, and relevance in a lesion-sized
blob (with weak noise everywhere), on a 1 x 1 x 3 mm grid. After one warm-up of each, old and new are timed
``--repeats`` times, interleaved (garbage collected before each), and the best of each is printed with the ratio
old / new, in wall-clock seconds and in CPU seconds of this process (less sensitive to other processes on a shared
machine), for the demo-sized case (6, 24, 48, 48) and a larger one (6, 64, 160, 160), with the machine and its load
average.

Run from the repository root: ``python bench/bench_figures.py [--repeats 3] [--sizes 24x48x48 64x160x160]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _machine import cpu_model  # noqa: E402 - bench/, the script's folder

from SegExplainLib.engine.metrics import relevance_shares  # noqa: E402
from SegExplainLib.io.figures import (  # noqa: E402
    explanation_figures,
    mip_figure,
    montage_figure,
    save_figure,
    shares_figure,
)
from SegExplainLib.io.imaging import Geometry  # noqa: E402

NAMES = ["T1", "T1c", "T2", "FLAIR", "DWI", "ADC"]
RECORD = {"method": "lrp", "options": {"composite": "epsilon_plus_flat"},
          "target": {"kind": "predicted", "class_index": 1, "aggregation": "sum"}, "target_score": 1234.5}


def synthetic_case(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, Geometry, np.ndarray]:
    """Image, relevance, geometry and region of a seeded synthetic case of spatial ``shape``."""
    rng = np.random.default_rng(0)
    d, h, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (d ** 2 + h ** 2 + w ** 2 < 0.8).astype(np.float32)
    image = np.stack([head * (0.5 + 0.1 * c) + 0.05 * rng.standard_normal(shape, dtype=np.float32)
                      for c in range(len(NAMES))])
    region = (d - 0.2) ** 2 + (h + 0.3) ** 2 + (w - 0.1) ** 2 < 0.04
    maps = 0.01 * rng.standard_normal(image.shape, dtype=np.float32)
    maps[:, region] += rng.standard_normal((len(NAMES), int(region.sum())), dtype=np.float32)
    geometry = Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), shape[::-1])
    return image, maps, geometry, region


def old_way(image: np.ndarray, maps: np.ndarray, folder: Path) -> None:
    shares = relevance_shares(maps, kind="positive")
    for filename, figure in (("mip.png", mip_figure(image, maps, sequence_names=NAMES)),
                             ("montage.png", montage_figure(image, maps, sequence_names=NAMES)),
                             ("shares.png", shares_figure(shares, sequence_names=NAMES))):
        save_figure(figure, folder / filename)


def new_way(image: np.ndarray, maps: np.ndarray, geometry: Geometry, region: np.ndarray, folder: Path) -> None:
    figures = explanation_figures(image, maps, sequence_names=NAMES, geometry=geometry, record=RECORD, region=region)
    for filename, figure in figures.items():
        save_figure(figure, folder / filename)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way after a warm-up")
    parser.add_argument("--sizes", nargs="+", default=["24x48x48", "64x160x160"], help="D x H x W of the cases")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for size in args.sizes:
            shape = tuple(int(n) for n in size.split("x"))
            image, maps, geometry, region = synthetic_case(shape)
            old_way(image, maps, folder)  # warm-up: fonts, caches
            new_way(image, maps, geometry, region, folder)
            times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for way in ("old", "new"):
                    gc.collect()  # neither way pays for the other's garbage
                    wall, cpu = time.perf_counter(), time.process_time()
                    if way == "old":
                        old_way(image, maps, folder)
                    else:
                        new_way(image, maps, geometry, region, folder)
                    times[way].append((time.perf_counter() - wall, time.process_time() - cpu))
            (old_wall, old_cpu), (new_wall, new_cpu) = (
                (min(t[0] for t in times[w]), min(t[1] for t in times[w])) for w in ("old", "new"))
            print(f"case (6, {', '.join(map(str, shape))}): old {old_wall:.3f} s, new {new_wall:.3f} s, "
                  f"old / new {old_wall / new_wall:.1f}x wall-clock; CPU {old_cpu:.3f} s vs {new_cpu:.3f} s, "
                  f"{old_cpu / new_cpu:.1f}x (best of {args.repeats})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
