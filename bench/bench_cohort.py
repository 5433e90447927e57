#!/usr/bin/env python
"""Benchmark: cases per minute of ``segexplain cohort``, serial (the model loaded per case) vs warm Ray workers.

The cohort is ``--cases`` generated demo cases (``SegExplainLib.application.demo.write_demo_case``, 6 sequences of 24x48x48,
with their ground truth), explained as ``segexplain demo`` does: the bundled demo model (``--card``), LRP
``epsilon_plus`` of the predicted lesion, on the CPU, maps, summary and figures written for every case (``--no-figures``
leaves the figures out). It is run three ways, each into a fresh folder and timed as a whole ``segexplain cohort``
call in this process:

* ``serial``: today's default, one ``segexplain explain`` per case, the model loaded per case; torch uses every core.
* ``ray 1 worker`` and ``ray 2 workers``: ``--workers 1`` / ``--workers 2``, a local Ray started by the command (its
  start-up is included), one model load per worker, ``torch.set_num_threads(cores // workers)`` in each worker.

It prints the machine (CPU model, cores, memory), the torch and Ray versions, the load average before and after each
run, the cases per minute and the ratio to the serial run. Each Ray run's time includes starting and stopping the
local Ray, which the script does itself to show it apart (``Ray start+stop``); ``cohort call`` is the rest: starting
the workers, loading the model in each, and the cases.

Run from the repository root::

    python bench/bench_cohort.py               # 8 cases
    python bench/bench_cohort.py --cases 16 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from _machine import cpu_model  # noqa: E402 - bench/, the script's folder

from SegExplainLib.application.demo import write_demo_case  # noqa: E402
from SegExplainLib.frontends import cli, raycohort  # noqa: E402
from SegExplainLib.models.demo_card import demo_card_path  # noqa: E402


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=positive, default=8, help="number of demo cases (default 8)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--no-figures", action="store_true", help="write no PNG figures per case")
    args = parser.parse_args()
    worker_counts = [positive(text) for text in args.workers.split(",")]
    import ray

    cores = os.cpu_count() or 1
    print(f"machine: {cpu_model()}, {cores} cores, {memory_gib():.0f} GiB; Python {platform.python_version()}, "
          f"torch {torch.__version__}, ray {ray.__version__}")
    print(f"cohort: {args.cases} demo cases (6 x 24 x 48 x 48), LRP epsilon_plus of the predicted lesion, "
          f"ground truth, figures {'off' if args.no_figures else 'on'}")
    explain = ["--card", str(demo_card_path()), "--class", "1", "--method", "lrp", "--composite", "epsilon_plus",
               "--device", "cpu", *(["--no-figures"] if args.no_figures else [])]
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as folder:
        root = Path(folder)
        rows = ["case,inputs,ground_truth"]
        for number in range(args.cases):
            paths, label = write_demo_case(root / f"case{number}", 1000 + number)
            rows.append(f"case{number},{';'.join(map(str, paths))},{label}")
        (root / "cases.csv").write_text("\n".join(rows) + "\n")

        results = []
        for label, workers in [("serial", None), *[(f"ray {n} worker{'s' if n > 1 else ''}", n)
                                                   for n in worker_counts]]:
            torch.set_num_threads(cores)  # the serial run's torch; the Ray workers set their own
            before = load()
            started = time.perf_counter()
            if workers:  # started here, as the command would, to time it apart; the command then uses it
                raycohort.start_ray()
            ready = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()) as log, contextlib.redirect_stdout(log):
                code = cli.main(["cohort", "--cases", str(root / "cases.csv"), "--output", str(root / label),
                                 *(["--workers", str(workers)] if workers else []), "--", *explain])
            cases_done = time.perf_counter()
            if workers:
                ray.shutdown()
            if code != 0:
                sys.exit(f"{label} failed (exit {code}):\n{log.getvalue()}")
            results.append((label, time.perf_counter() - started, cases_done - ready, before, load()))

    serial = results[0][1]
    print(f"\n{'run':<16}{'seconds':>9}{'cases/min':>11}{'vs serial':>11}{'Ray start+stop':>16}"
          f"{'cohort call':>13}   load before -> after")
    for label, seconds, cohort_seconds, before, after in results:
        print(f"{label:<16}{seconds:>9.1f}{args.cases / seconds * 60:>11.1f}{serial / seconds:>10.2f}x"
              f"{seconds - cohort_seconds:>16.1f}{cohort_seconds:>13.1f}   {before} -> {after}")


if __name__ == "__main__":
    main()
