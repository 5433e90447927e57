#!/usr/bin/env python
"""Integrated Gradients on instance-normalized networks: gradient passes needed to reach 1 % completeness.

For each network, baseline and quadrature, IG of the sum of the class-1 logits over a box is computed with a growing
budget of gradient passes (8, 16, ..., up to ``--max-passes``) until the maps sum to the score change within 1 %
(``|sum(maps) - (F(x) - F(x0))| / |F(x) - F(x0)|``). Printed: the first budget that got there (``>N`` if none did),
the gradient passes it spent, and the relative delta at 64 passes.

- SegExplain ``quadrature="adaptive"``: ``n_steps`` is its budget; it stops earlier once it is within its tolerance
  (here 0.5 %, so that the 1 % mark is reached with some margin); its forward-only passes are listed apart.
- captum 0.9 ``IntegratedGradients`` with its uniform rules ``gausslegendre`` (its default) and
  ``riemann_trapezoid``, ``n_steps`` = the budget, on a wrapper that returns the box's score.

Networks (6 input sequences, 2 classes), on the demo case (24x48x48, z-scored as the demo card says):

- ``demo``: the bundled demo U-Net (InstanceNorm after every convolution, ReLU);
- ``nnunet_like seed S``: :func:`SegExplainLib.models.realnets.nnunet_like`, a residual-encoder U-Net in nnU-Net's layout
  (InstanceNorm in train mode, LeakyReLU, residual blocks, transposed-convolution upsampling), seeded weights.

Run from the repository root (about 15 minutes on 2 CPU cores)::

    python bench/bench_ig_convergence.py
    python bench/bench_ig_convergence.py --max-passes 512 --json ig.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _machine import cpu_model, report  # noqa: E402 - bench/, the script's folder

from SegExplainLib.application import demo  # noqa: E402
from SegExplainLib.engine.deployment import deployed  # noqa: E402
from SegExplainLib.engine.gradients import IntegratedGradients  # noqa: E402
from SegExplainLib.models import realnets  # noqa: E402
from SegExplainLib.models.demo_card import demo_card_path  # noqa: E402
from SegExplainLib.models.loading import ModelCard  # noqa: E402

BOX = (slice(8, 16), slice(20, 28), slice(20, 28))
GOAL = 0.01
BASELINES = ("zero", "blur:5")


class BoxScore(nn.Module):
    """captum's view: the score of the box, one number per batch row."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[(slice(None), 1, *BOX)].sum(dim=(1, 2, 3))


def networks(seeds: list[int]) -> list[tuple[str, nn.Module]]:
    card = ModelCard.read(demo_card_path())
    found = [("demo", card.load_model())]
    found += [(f"nnunet_like seed {s}", realnets.nnunet_like(in_channels=6, out_channels=2, seed=s)) for s in seeds]
    return found


def case() -> torch.Tensor:
    card = ModelCard.read(demo_card_path())
    image = card.normalize(demo.make_case(demo.HELD_OUT_SEEDS[0])[0])
    return torch.as_tensor(image, dtype=torch.float32)[None]


def ours(model: nn.Module, x: torch.Tensor, baseline: str, budget: int) -> dict[str, Any]:
    with torch.no_grad():
        seed = torch.zeros(model(x).shape)
    seed[(slice(None), 1, *BOX)] = 1.0
    method = IntegratedGradients(n_steps=budget, tolerance=GOAL / 2, baseline=baseline)
    out = method.attribute(model, x, seed)
    return {"relative_delta": float(out.delta.abs() / out.expected.abs()), "gradient_passes":
            out.extras["gradient_passes"], "forward_passes": out.extras["forward_passes"]}


def captum(model: nn.Module, x: torch.Tensor, baseline: str, budget: int, rule: str) -> dict[str, Any]:
    from captum.attr import IntegratedGradients as CaptumIG

    x0 = IntegratedGradients(baseline=baseline).baseline(x)
    _, delta = CaptumIG(BoxScore(model)).attribute(x, baselines=x0, n_steps=budget, method=rule,
                                                     internal_batch_size=2, return_convergence_delta=True)
    with torch.no_grad():
        expected = float(BoxScore(model)(x) - BoxScore(model)(x0))
    return {"relative_delta": abs(float(delta)) / abs(expected), "gradient_passes": budget, "forward_passes": 2}


def passes_to_goal(run, max_passes: int) -> dict[str, Any]:
    budgets, at_64, reached = [], None, None
    budget = 8
    while budget <= max_passes:
        result = run(budget)
        budgets.append({"budget": budget, **result})
        if budget == 64:
            at_64 = result["relative_delta"]
        if result["relative_delta"] < GOAL and reached is None:
            reached = result
            if budget >= 64:
                break
        budget *= 2
    return {"reached": reached, "at_64": at_64, "runs": budgets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-passes", type=int, default=256, help="largest budget tried (default 256)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the nnU-Net-like networks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the completeness warnings of the small budgets are the point of the table
    x = case()
    started = time.perf_counter()
    rows = []
    for name, model in networks(args.seeds):
        with deployed(model):
            for baseline in BASELINES:
                runs = {"SegExplain adaptive": lambda n, m=model, b=baseline: ours(m, x, b, n)}
                for rule in ("gausslegendre", "riemann_trapezoid"):
                    runs[f"captum {rule}"] = lambda n, m=model, b=baseline, r=rule: captum(m, x, b, n, r)
                for label, run in runs.items():
                    result = passes_to_goal(run, args.max_passes)
                    rows.append({"network": name, "baseline": baseline, "quadrature": label, **result})
                    reached = result["reached"]
                    shown = (f"{reached['gradient_passes']:>4} (+{reached['forward_passes']} fwd)"
                             if reached and label.startswith("SegExplain") else
                             f"{reached['gradient_passes']:>4}" if reached else f">{args.max_passes}")
                    at_64 = "-" if result["at_64"] is None else f"{100 * result['at_64']:.2f} %"
                    print(f"{name:<20} {baseline:<7} {label:<28} passes to 1 %: {shown:<16} delta at 64: {at_64}",
                          flush=True)
    info = {"machine": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
    report(info, {"rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
