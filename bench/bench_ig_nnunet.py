#!/usr/bin/env python
"""Integrated Gradients on a real-size nnU-Net: completeness against gradient passes, and the score along the path.

The network is nnU-Net's ``PlainConvUNet`` (dynamic_network_architectures) built from a real nnU-Net ``plans.json``
(its 3d_fullres configuration, names resolved by SegExplain's allow-lists): its layers (Conv3d, InstanceNorm3d with
affine, LeakyReLU, conv bias, two convolutions per stage) deepened to 6 stages of 32, 64, 128, 256, 320, 320
features as nnU-Net's planner does for larger images, deep supervision off, 6 input sequences and 2 classes. It is
trained (``--train-steps``, 300 by default, where the loss is about 0.01; Adam, cross-entropy plus soft Dice,
seeded) on demo cases of 16x32x32 voxels, then explained on a held-out case for a box in the lesion (``--region``:
or the same box across the lesion's edge, or the whole predicted lesion).

Every rule sees the score only through ``F(alpha)`` and ``F'(alpha) = (x - x0) . grad f(x0 + alpha (x - x0))``, so
the bench evaluates each at most once per ``alpha`` (cached) and runs the project's rules on those numbers:
``quadrature.adaptive`` (budgets 16 to ``--max-passes``) and, at 64 passes, the fixed rules ``gausslegendre`` and
``riemann_trapezoid``. Printed: the relative completeness delta per budget, and a table of ``F`` and ``|F'|`` on a
log grid of ``alpha``.

Run from the repository root, with the plans of the test fixture (``python Testing/nnunet_fixture.py ROOT`` makes
one)::

    python bench/bench_ig_nnunet.py --weights /tmp/w.pt --cache /tmp/cache.json \\
        --plans ROOT/nnUNet_results/Dataset001_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _machine import cpu_model, report  # noqa: E402 - bench/, the script's folder

from SegExplainLib.application import demo  # noqa: E402
from SegExplainLib.engine import quadrature  # noqa: E402
from SegExplainLib.engine.gradients import IntegratedGradients  # noqa: E402
from SegExplainLib.models.nnunet_safety import plans_objects  # noqa: E402

#: The patch: the largest whose gradient pass takes about a second on 2 CPU cores (nnU-Net's planner would give a
#: 6-stage network patches of 128 voxels and more along the in-plane axes).
SHAPE = (16, 32, 32)
#: Each axis halved down to 2 voxels (z one stage later), the last stage at the bottleneck's resolution.
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1]]
FEATURES = [32, 64, 128, 256, 320, 320]
BASELINES = ("blur:5", "zero")
REGIONS = ("box", "boundary", "lesion")


def network(plans_path: Path) -> torch.nn.Module:
    plans = json.loads(plans_path.read_text())
    objects = plans_objects(plans, plans["configurations"]["3d_fullres"], source=str(plans_path), trust_code=False)
    kwargs = {**objects.arch_kwargs, "n_stages": 6, "features_per_stage": FEATURES, "kernel_sizes": [[3, 3, 3]] * 6,
              "strides": STRIDES, "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5}
    return objects.network(input_channels=6, num_classes=2, deep_supervision=False, **kwargs)


def train(model: torch.nn.Module, steps: int, seed: int = 0) -> float:
    """A brief, seeded training on demo cases (the demo's loss); returns the last loss."""
    torch.manual_seed(seed)
    pairs = [demo.make_case(s, shape=SHAPE) for s in range(8)]
    images = torch.from_numpy(np.stack([demo._zscore(image) for image, _ in pairs]))
    labels = torch.from_numpy(np.stack([label for _, label in pairs]).astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        if step and step % 50 == 0:
            print(f"step {step}: loss {float(loss.detach()):.3f}", flush=True)
        index = torch.tensor([(2 * step) % 8, (2 * step + 1) % 8])
        logits = model(images[index])
        truth = (labels[index] == 1).float()
        probability = logits.softmax(1)[:, 1]
        soft_dice = (2 * (probability * truth).sum() + 1.0) / (probability.sum() + truth.sum() + 1.0)
        loss = torch.nn.functional.cross_entropy(logits, labels[index]) + (1.0 - soft_dice)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def explained_region(model: torch.nn.Module, x: torch.Tensor, label: np.ndarray, region: str) -> torch.Tensor:
    """The voxels whose lesion logits make the score, as a boolean mask (see ``--region``)."""
    if region == "lesion":
        with torch.no_grad():
            return model(x)[0].argmax(0) == 1
    centre = np.argwhere(label == 1).mean(0).astype(int)
    if region == "boundary":  # from the lesion's centre along W to its first voxel outside
        while label[tuple(centre)] == 1:
            centre[2] += 1
    mask = torch.zeros(label.shape, dtype=torch.bool)
    mask[tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, (2, 4, 4)))] = True
    return mask


class ScorePath:
    """``F`` and ``F'`` along the straight path from a baseline, each ``alpha`` evaluated once."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, region: torch.Tensor, baseline: str) -> None:
        self.model, self.x, self.region = model, x, region
        self.x0 = IntegratedGradients(baseline=baseline).baseline(x)
        self.diff = x - self.x0
        self.f: dict[float, float] = {}
        self.slope: dict[float, float] = {}

    def _score(self, alpha: float, grad: bool) -> float:
        point = (self.x0 + alpha * self.diff).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            score = self.model(point)[0, 1][self.region].sum()
        if grad:
            (gradient,) = torch.autograd.grad(score, point)
            self.slope[alpha] = float((gradient * self.diff).sum())
        self.f[alpha] = float(score.detach())
        return self.f[alpha]

    def scores(self, alphas: np.ndarray) -> np.ndarray:
        return np.array([[self.f.get(a) if a in self.f else self._score(a, False)] for a in map(float, alphas)])

    def slopes(self, alphas: np.ndarray) -> np.ndarray:
        return np.array([self.slope[a] if a in self.slope else (self._score(a, True), self.slope[a])[1]
                         for a in map(float, alphas)])

    def integrate(self, nodes: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        estimate = float(np.dot(weights, self.slopes(nodes)))
        return estimate, np.array([estimate])

    def change(self) -> float:
        return float(self.scores(np.array([1.0]))[0, 0] - self.scores(np.array([0.0]))[0, 0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=Path, required=True, help="an nnU-Net plans.json with a 3d_fullres "
                        "configuration")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--max-passes", type=int, default=256)
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES))
    parser.add_argument("--region", choices=REGIONS, default="box", help="box: a box in the lesion; boundary: the "
                        "same box centred on the lesion's edge; lesion: every voxel the network labels lesion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path, help="load the trained weights from this file, or train and save them")
    parser.add_argument("--cache", type=Path, help="reuse and extend F and F' of earlier runs (same weights)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)  # the initial weights, which train() does not seed
    model = network(args.plans)
    if args.weights and args.weights.exists():
        model.load_state_dict(torch.load(args.weights, weights_only=True))
        model.eval()
    else:
        loss = train(model, args.train_steps)
        print(f"trained {args.train_steps} steps: loss {loss:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if args.weights:
            torch.save(model.state_dict(), args.weights)
    image, label = demo.make_case(demo.HELD_OUT_SEEDS[0], shape=SHAPE)
    x = torch.from_numpy(demo._zscore(image))[None]
    region = explained_region(model, x, label, args.region)
    print(f"region {args.region}: {int(region.sum())} voxels", flush=True)
    rows = []
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    budgets = [b for b in (16, 32, 64, 128, 256, 512) if b <= args.max_passes]
    for baseline in args.baselines:
        key, case = f"{args.region} {baseline}", {"baseline": baseline, "region": args.region}
        path = ScorePath(model, x, region, baseline)
        if key in cache:  # F and F' of an earlier run on the same weights
            path.f, path.slope = ({float(a): v for a, v in cache[key][name].items()} for name in ("F", "slope"))
        change = path.change()
        grid = np.array([0.0, *np.logspace(-8, -1, 8), 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
        f, slope = path.scores(grid)[:, 0], path.slopes(grid)
        print(f"{baseline}: F(1) - F(0) = {change:.5g}")
        for a, fa, sa in zip(grid, f, slope):
            print(f"  alpha {a:8.1e}  F {fa:12.5g}  |F'| {abs(sa):12.5g}")
        for budget in budgets:
            plan = quadrature.adaptive(path.scores, path.integrate, max_passes=budget, tolerance=0.005)
            rows.append({**case, "rule": "adaptive", "budget": budget, "passes": plan.gradient_passes,
                         "relative_delta": abs(plan.contribution - change) / abs(change), "panels": plan.panels})
            for rule in ("gausslegendre", "riemann_trapezoid") if budget == 64 else ():
                nodes, weights = quadrature.fixed_rule(rule, budget)
                estimate, _ = path.integrate(nodes, weights)
                rows.append({**case, "rule": rule, "budget": budget, "passes": budget,
                             "relative_delta": abs(estimate - change) / abs(change)})
            if args.cache:
                args.cache.write_text(json.dumps({**cache, key: {"F": path.f, "slope": path.slope}}))
            for row in rows[-3 if budget == 64 else -1:]:
                print(f"{baseline:<7} {row['rule']:<18} budget {budget:>4}: passes {row['passes']:>4} "
                      f"delta {100 * row['relative_delta']:8.2f} %", flush=True)
        cache[key] = {"F": path.f, "slope": path.slope}
        if args.cache:
            args.cache.write_text(json.dumps(cache))
        rows.append({**case, "profile": {"alpha": grid.tolist(), "F": f.tolist(), "slope": slope.tolist()}})
    info = {"machine": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
            "load": os.getloadavg(), "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
    report(info, {"rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
