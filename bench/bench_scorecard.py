#!/usr/bin/env python
"""Benchmark: the scorecard of six methods on the demo case (``segexplain evaluate`` on ``segexplain demo``'s case).

The demo case (seed 1000, six sequences of 24 x 48 x 48 voxels) is written to a temporary folder and scored with the
demo card and the predicted lesion region, exactly as the command does
(:func:`~SegExplainLib.application.evaluation.run_evaluation`, figure included). The time of each step is printed
from the progress callbacks, with the total, the CPU seconds of the process, the forward passes of the faithfulness
curves, the machine and its load average before and after (the machine may be shared: the load says how much, and
the CPU seconds move less with it than the wall-clock time).

Method sets (``--methods``, each run in turn when several are named, so that their times share one machine state):
``families`` is ``segexplain evaluate``'s default, one method of each family (gradient, Integrated Gradients, LRP,
DeepLIFT, Guided Backprop, per-sequence Shapley); ``previous`` is the default before it (gradient, gradient x input,
Integrated Gradients, SmoothGrad, LRP, Guided Backprop). Both give Integrated Gradients 16 gradient passes,
SmoothGrad 8 samples and per-sequence Shapley forward passes of 8 images.

Presets (``--preset``): ``default`` is the command's defaults (16 steps, 5 random orders, 3 randomization stages,
4 noisy inputs); ``fast`` is 8 steps, 3 random orders, 2 stages and 2 noisy inputs with blocks of 4 voxels.

Run from the repository root: ``python bench/bench_scorecard.py [--preset fast] [--methods families previous]
[--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import resource
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
from SegExplainLib.application.requests import EVALUATED_METHODS, CaseRun, EvaluationRun, ExplainRequest  # noqa: E402
from SegExplainLib.models.demo_card import demo_card_path  # noqa: E402

PRESETS = {"default": {}, "fast": {"steps": 8, "random_orders": 3, "randomization_stages": 2, "n_perturbations": 2}}
METHOD_SETS = {"families": EVALUATED_METHODS,
               "previous": ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "lrp",
                            "guided_backprop")}
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 8},
                  "sequence_shapley": {"internal_batch_size": 8}}


class TimedProgress(Progress):
    """Prints each step with the seconds since the start."""

    def step(self, name: str) -> None:
        print(f"{time.perf_counter() - self.started:7.1f} s  {name}", flush=True)


def cpu_seconds() -> float:
    """User and system CPU seconds of this process so far (every torch thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def score(folder: Path, inputs: list[Path], methods: tuple[str, ...], preset: str) -> None:
    """One scorecard of ``methods``, its steps, table, total, CPU seconds and the load after."""
    run = EvaluationRun(CaseRun(tuple(map(str, inputs)), str(folder / f"scorecard-{len(os.listdir(folder))}"),
                                ModelSource("card", str(demo_card_path())), ExplainRequest(device="cpu")),
                        methods=methods, method_options={m: o for m, o in METHOD_OPTIONS.items() if m in methods},
                        **PRESETS[preset])
    load, cpu, started = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    card = run_evaluation(run, TimedProgress("none", []))
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    passes = 2 + len(card.curves) * 2 * (card.settings["steps"] - 1)
    print(card.table())
    print(f"total {seconds:.1f} s ({cpu:.1f} CPU seconds) for {len(card.methods)} methods: {' '.join(methods)}; "
          f"faithfulness: {passes} forward passes in batches of "
          f"{next(iter(card.methods.values()))['faithfulness']['batch_size']}; load average before {load:.1f}, "
          f"after {os.getloadavg()[0]:.1f}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHOD_SETS), default=["families"],
                        help="method sets to score, in turn (default: families)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {os.cpu_count()} cores, torch threads {args.threads}, load average before "
          f"{os.getloadavg()[0]:.1f}; preset {args.preset}: {PRESETS[args.preset] or 'the defaults'}")
    with tempfile.TemporaryDirectory() as folder:
        inputs, _ = demo.write_demo_case(Path(folder) / "case")
        for name in args.methods:
            score(Path(folder), inputs, METHOD_SETS[name], args.preset)


if __name__ == "__main__":
    main()
