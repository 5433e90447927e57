#!/usr/bin/env python
"""Benchmark: the scorecard of six methods on the demo case (``segexplain evaluate`` on ``segexplain demo``'s case).

The demo case (seed 1000, six sequences of 24 x 48 x 48 voxels) is written to a temporary folder and scored with the
demo card, the predicted lesion region and the six methods of ``segexplain evaluate``'s default (gradient,
gradient x input, Integrated Gradients, SmoothGrad, LRP, Guided Backprop), exactly as the command does
(:func:`~SegExplainLib.application.evaluation.run_evaluation`, figure included). The time of each step is printed
from the progress callbacks, with the total, the forward passes of the faithfulness curves, the machine and its load
average (the machine may be shared: the load says how much).

Presets (``--preset``): ``default`` is the command's defaults (16 steps, 5 random orders, 3 randomization stages,
4 noisy inputs); ``fast`` is 8 steps, 3 random orders, 2 stages and 2 noisy inputs with blocks of 4 voxels. Both
give Integrated Gradients 16 gradient passes and SmoothGrad 8 samples.

Run from the repository root: ``python bench/bench_scorecard.py [--preset fast] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _machine import cpu_model  # noqa: E402 - bench/, the script's folder

from SegExplainLib.application import demo  # noqa: E402
from SegExplainLib.application.case_run import Progress  # noqa: E402
from SegExplainLib.application.evaluation import run_evaluation  # noqa: E402
from SegExplainLib.application.model_source import ModelSource  # noqa: E402
from SegExplainLib.application.requests import CaseRun, EvaluationRun, ExplainRequest  # noqa: E402
from SegExplainLib.models.demo_card import demo_card_path  # noqa: E402

PRESETS = {"default": {}, "fast": {"steps": 8, "random_orders": 3, "randomization_stages": 2, "n_perturbations": 2}}
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 8}}


class TimedProgress(Progress):
    """Prints each step with the seconds since the start."""

    def step(self, name: str) -> None:
        print(f"{time.perf_counter() - self.started:7.1f} s  {name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {os.cpu_count()} cores, torch threads {args.threads}, load average before "
          f"{os.getloadavg()[0]:.1f}; preset {args.preset}: {PRESETS[args.preset] or 'the defaults'}")
    with tempfile.TemporaryDirectory() as folder:
        inputs, _ = demo.write_demo_case(Path(folder) / "case")
        run = EvaluationRun(CaseRun(tuple(map(str, inputs)), str(Path(folder) / "scorecard"),
                                    ModelSource("card", str(demo_card_path())), ExplainRequest(device="cpu")),
                            method_options=METHOD_OPTIONS, **PRESETS[args.preset])
        started = time.perf_counter()
        card = run_evaluation(run, TimedProgress("none", []))
        seconds = time.perf_counter() - started
    passes = 2 + len(card.curves) * 2 * (card.settings["steps"] - 1)
    print(card.table())
    print(f"total {seconds:.1f} s for {len(card.methods)} methods; faithfulness: {passes} forward passes in batches "
          f"of {next(iter(card.methods.values()))['faithfulness']['batch_size']}; load average after "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
