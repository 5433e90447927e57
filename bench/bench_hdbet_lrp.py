#!/usr/bin/env python
"""LRP against one input gradient on an HD-BET-like network (nnU-Net ResEnc), both timed in one run.

HD-BET 2 is an nnU-Net v2 residual-encoder U-Net whose plans come with its weights, which nothing here downloads.
The stand-in is ``dynamic_network_architectures``' ``ResidualEncoderUNet`` (the class nnU-Net builds for ResEnc
plans) in the ResEnc M layout: 6 stages of 32-320 features, 1-3-4-6-6-6 residual blocks, instance norm (affine,
train mode as deployed), in-place LeakyReLU, random weights, one T1 channel, two classes.

Timed, interleaved (round robin; best of ``--repeats`` after one warm-up), on one random volume:

- ``plain gradient``: in plain torch, one forward pass with grad, the predicted brain read off its logits as the
  seed, ``torch.autograd.grad(logits, x, seed)``: the unit of every ratio, finding the region included;
- ``plain gradient, seed given``: the same with the seed made beforehand;
- ``explain gradient`` / ``explain lrp <composite>``: :func:`SegExplainLib.explain` with
  ``PredictedRegion(class_index=1)``, so including finding the predicted region (LRP reads it off its own
  forward pass; the gradient runs a separate one);
- ``lrp <composite> alone``: ``LRP(composite).attribute`` with that seed (no region to find).

Run from the repository root (about 3 minutes on 2 CPU cores at the default size)::

    python bench/bench_hdbet_lrp.py
    python bench/bench_hdbet_lrp.py --shape 64 64 64 --repeats 3 --json hdbet.json
    python bench/bench_hdbet_lrp.py --composites epsilon_plus epsilon
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _machine import cpu_model, report  # noqa: E402 - bench/, the script's folder

from SegExplainLib import PredictedRegion, explain  # noqa: E402
from SegExplainLib.engine.deployment import deployed  # noqa: E402
from SegExplainLib.engine.lrp import LRP  # noqa: E402

COMPOSITES = ("epsilon_plus", "epsilon_plus_flat", "epsilon")
TARGET = 1.3  # LRP's time, finding the region included, in units of one plain gradient


def hdbet_like(seed: int = 0) -> nn.Module:
    """nnU-Net's ResidualEncoderUNet in the ResEnc M layout, random weights, as the predictor runs it."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    torch.manual_seed(seed)
    model = ResidualEncoderUNet(1, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2, 2),
                                (1, 3, 4, 6, 6, 6), 2, (1, 1, 1, 1, 1), True, nn.InstanceNorm3d,
                                {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                                deep_supervision=False)
    return model.eval().requires_grad_(False)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Every timed call per run, round robin so that load changes on a shared machine hit all runs alike."""
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64],
                        help="volume D H W: multiples of 32, one of them 64 or more (the deepest instance norm needs "
                             "more than one voxel)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--composites", nargs="+", default=list(COMPOSITES), help="LRP composites to time")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if any(n <= 0 or n % 32 for n in args.shape) or max(args.shape) < 64:
        parser.error(f"--shape {' '.join(map(str, args.shape))}: expected multiples of 32 with one of them 64 or more "
                     "(five stride-2 stages leave shape/32 voxels to the deepest instance norm, which needs two)")
    torch.set_num_threads(args.threads)
    model = hdbet_like()
    x = torch.randn(1, 1, *args.shape)
    image = x[0].numpy()
    with torch.no_grad(), deployed(model):
        predicted = model(x).argmax(1, keepdim=True) == 1
    seed = torch.zeros(1, 2, *args.shape)
    seed[:, 1:2][predicted] = 1.0

    def plain(given: torch.Tensor | None = None) -> None:
        with deployed(model):
            leaf = x.clone().requires_grad_(True)
            logits = model(leaf)
            if given is None:
                given = torch.zeros_like(logits)
                given[:, 1:2][logits.detach().argmax(1, keepdim=True) == 1] = 1.0
            torch.autograd.grad(logits, leaf, given)

    runs: dict[str, Callable[[], object]] = {
        "plain gradient": plain,
        "plain gradient, seed given": lambda: plain(seed),
        "explain gradient": lambda: explain(model, image, PredictedRegion(class_index=1), "gradient", device="cpu"),
    }
    for composite in args.composites:
        runs[f"explain lrp {composite}"] = lambda c=composite: explain(
            model, image, PredictedRegion(class_index=1), "lrp", device="cpu", composite=c)
        runs[f"lrp {composite} alone"] = lambda c=composite: LRP(composite=c).attribute(model, x, seed)
    load_before = os.getloadavg()
    times = interleaved(runs, args.repeats)
    best = {name: min(seconds) for name, seconds in times.items()}
    load_after = os.getloadavg()
    unit = best["plain gradient"]
    print(f"HD-BET-like ResEnc U-Net, input {tuple(x.shape)}, predicted region {int(predicted.sum())} voxels")
    for name, seconds in best.items():
        verdict = ""
        if name.startswith("explain lrp"):
            verdict = f"  target <= {TARGET}x: {'met' if seconds / unit <= TARGET else 'missed'}"
        every = " ".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<32} {seconds:8.2f} s  {seconds / unit:5.2f}x one gradient{verdict}  (runs: {every})")
    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "shape": args.shape, "load_average_before": load_before, "load_average_after": load_after}
    report(info, {"seconds": times, "ratios": {k: v / unit for k, v in best.items()}}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
