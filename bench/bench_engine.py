#!/usr/bin/env python
"""Benchmark of SegExplain's explanation engine against a plain input gradient, captum and (if importable) zennit.

Everything the issue asks for is measured side by side in ONE run and printed as plain-text tables:

1. ``baseline``: one input gradient in plain torch, ``torch.autograd.grad((seed * model(x)).sum(), x)`` on the
   user's model (parameters not requiring grad). Not SegExplain code; every ratio is relative to it.
2. ``Gradient``, ``Gradient x Input``, ``SmoothGrad`` (2 samples), ``Guided Backprop``, ``Deconvolution``: SegExplain's
   gradient family, which runs the model through autograd with float32 CPU convolutions routed to oneDNN (reported,
   not judged; a ratio below 1 is the routing's gain over the stock dispatch of 1).
3. ``LRP epsilon`` / ``LRP epsilon_plus_flat``: ``LRP(composite=...).attribute``. Targets: time <= 1.1x / 1.5x and
   peak memory <= 1.5x of the baseline, at every size.
4. Integrated Gradients, n_steps=32, Gauss-Legendre, zero baseline (captum's defaults): captum with internal_batch_size 1, 2, 4, 8 on a wrapper that
   returns ``(seed * model(x)).sum((1, 2, 3, 4))`` vs SegExplain with the automatic internal batch size. Target: ours
   at least as fast as captum's best batch size.
5. Normalized aggregation throughput (output voxels per second): ``explain(..., BoxTarget(aggregation="normalized"),
   "lrp")`` (exact path) over a 4x8x8 region vs one LRP pass per output voxel. Target: >= 3x.
6. zennit's EpsilonPlusFlat with its BatchNorm canonizer, when zennit can be imported.

Timing: one warm-up call, then the best (minimum) of ``--repeats`` calls timed with ``time.perf_counter``; the
methods of one table are interleaved (round robin) so that load changes on a shared machine hit them alike.
Peak memory: one fresh subprocess per (method, size); see ``bench/README.md``.

Run from the repository root::

    python bench/bench_engine.py                 # full run: sizes A, M, L (about 10 minutes on 2 CPU cores)
    python bench/bench_engine.py --quick         # smoke test: size A, one repeat
    python bench/bench_engine.py --device cuda --sizes A,M,L --ig-sizes A,M --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from SegExplainLib.engine.api import explain  # noqa: E402
from SegExplainLib.engine.gradients import Gradient, GradientXInput, IntegratedGradients, SmoothGrad  # noqa: E402
from SegExplainLib.engine.lrp import LRP, Deconvolution, GuidedBackprop  # noqa: E402
from SegExplainLib.engine.targets import BoxTarget  # noqa: E402
from SegExplainLib.models.networks import reference_unet  # noqa: E402

SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "A": (1, 6, 19, 48, 48),
    "M": (1, 6, 32, 96, 96),
    "L": (1, 6, 64, 128, 128),
}

SMOOTHGRAD_SAMPLES = 2
# Time and memory targets relative to the baseline gradient (None: reported, not judged).
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "baseline": (None, None),
    "gradient": (None, None),
    "gradient_x_input": (None, None),
    "smoothgrad": (None, None),
    "guided_backprop": (None, None),
    "deconvolution": (None, None),
    "lrp_epsilon": (1.1, 1.5),
    "lrp_epsilon_plus_flat": (1.5, 1.5),
    "zennit_epsilon_plus_flat": (None, None),
}
LABELS = {
    "baseline": "baseline torch.autograd.grad",
    "gradient": "SegExplain Gradient",
    "gradient_x_input": "SegExplain Gradient x Input",
    "smoothgrad": f"SegExplain SmoothGrad ({SMOOTHGRAD_SAMPLES} samples)",
    "guided_backprop": "SegExplain Guided Backprop",
    "deconvolution": "SegExplain Deconvolution",
    "lrp_epsilon": "LRP epsilon",
    "lrp_epsilon_plus_flat": "LRP epsilon_plus_flat",
    "zennit_epsilon_plus_flat": "zennit EpsilonPlusFlat+BN",
}
IG_STEPS = 32
IG_METHOD = "gausslegendre"
CAPTUM_BATCHES = (1, 2, 4, 8)
NORMALIZED_REGION = (4, 8, 8)  # 256 output voxels
NAIVE_VOXELS = 8
NORMALIZED_TARGET = 3.0
ISSUE_ZENNIT = "EpsilonPlusFlat 3.2x/2.7x/4.2x the time of a gradient (A/M/L), 2.6x its memory"
MIB = 1024.0**2
MMAP_THRESHOLD = 128 * 1024  # bytes; see measure_memory


# ----------------------------------------------------------------------------------------------------------------
# Set-up: model, input, seed
# ----------------------------------------------------------------------------------------------------------------


def build_model(device: torch.device) -> nn.Module:
    """reference_unet() seeded, with realistic non-trivial BatchNorm statistics and affine parameters, eval, frozen."""
    torch.manual_seed(0)
    model = reference_unet()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def build_input(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A seeded standard-normal volume (z-scored MRI intensities)."""
    generator = torch.Generator().manual_seed(2)
    return torch.randn(shape, generator=generator).to(device)


def central_box(spatial: tuple[int, ...], size: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    start = tuple((s - b) // 2 for s, b in zip(spatial, size))
    return start, tuple(a + b for a, b in zip(start, size))


def box_seed(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One on a central box (a quarter of each axis) in class channel 1 of the logits (1, 2, D, H, W)."""
    spatial = shape[2:]
    start, stop = central_box(spatial, tuple(max(1, s // 4) for s in spatial))
    seed = torch.zeros((shape[0], 2, *spatial))
    seed[(slice(None), 1, *(slice(a, b) for a, b in zip(start, stop)))] = 1.0
    return seed.to(device)


def class_seed(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One on every voxel of class channel 1: the whole class channel, relevance everywhere in every layer."""
    seed = torch.zeros((shape[0], 2, *shape[2:]))
    seed[:, 1] = 1.0
    return seed.to(device)


# The targets of sections 1-3: a central box is what a click or a box explains (SegExplain then works on the part
# of each layer that receives relevance); the whole class channel is the dense worst case.
SEEDS: dict[str, Callable[[tuple[int, ...], torch.device], torch.Tensor]] = {"box": box_seed, "class": class_seed}


# ----------------------------------------------------------------------------------------------------------------
# The methods compared against the baseline gradient
# ----------------------------------------------------------------------------------------------------------------


def zennit_status() -> tuple[bool, str]:
    try:
        import zennit  # noqa: F401
        from zennit.attribution import Gradient as _G  # noqa: F401
        from zennit.canonizers import SequentialMergeBatchNorm  # noqa: F401
        from zennit.composites import EpsilonPlusFlat  # noqa: F401
    except Exception as error:  # ImportError, or torchvision failing inside it
        first = str(error).splitlines()[0] if str(error) else ""
        return False, f"{type(error).__name__}: {first}"
    return True, f"zennit {getattr(zennit, '__version__', '?')}"


def make_runners(with_zennit: bool) -> dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, Any]]]:
    """name -> f(model, x, seed) returning {"maps": tensor, ...}; each call is one full explanation."""

    def baseline(model, x, seed):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((seed * model(x)).sum(), x)
        return {"maps": grad}

    def plain(method):
        def run(model, x, seed):
            return {"maps": method.attribute(model, x, seed).maps}
        return run

    def lrp(composite):
        method = LRP(composite=composite)

        def run(model, x, seed):
            out = method.attribute(model, x, seed)
            return {"maps": out.maps, "delta": out.delta, "expected": out.expected}

        return run

    runners = {"baseline": baseline, "gradient": plain(Gradient()), "gradient_x_input": plain(GradientXInput()),
               "smoothgrad": plain(SmoothGrad(n_samples=SMOOTHGRAD_SAMPLES)),
               "guided_backprop": plain(GuidedBackprop()), "deconvolution": plain(Deconvolution()),
               "lrp_epsilon": lrp("epsilon"), "lrp_epsilon_plus_flat": lrp("epsilon_plus_flat")}
    if with_zennit:
        from zennit.attribution import Gradient as ZGradient
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat

        def zennit_epf(model, x, seed):
            composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
            with ZGradient(model=model, composite=composite) as attributor:
                _, relevance = attributor(x, seed)
            return {"maps": relevance}

        runners["zennit_epsilon_plus_flat"] = zennit_epf
    return runners


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy seconds of all cores from /proc/stat, wall seconds x cores, CPU seconds of this process) or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz, own.user + own.system


def foreign_cpu_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None
                      ) -> float | None:
    """Fraction of the machine's CPU time used by other processes (and the kernel) between two snapshots."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    other = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, other / (after[1] - before[1]))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                warmups: dict[str, Callable[[], Any]] | None = None, log: Callable[[str], None] = print
                ) -> tuple[dict[str, list[float]], dict[str, Any], float | None]:
    """Warm each function up once, then time ``repeats`` rounds, each calling every function once in turn.

    Returns all times per function, the result of each function's last call, and the share of the CPU that other
    processes used during the timed rounds (see :func:`foreign_cpu_share`).
    """
    results: dict[str, Any] = {}
    for name, fn in fns.items():
        warm = (warmups or {}).get(name, fn)
        seconds, _ = timed(warm, device)
        log(f"    warm-up {name}: {seconds:.2f} s")
    times: dict[str, list[float]] = {name: [] for name in fns}
    before = cpu_snapshot()
    for r in range(repeats):
        for name, fn in fns.items():
            seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
            log(f"    run {r + 1}/{repeats} {name}: {seconds:.2f} s")
    foreign = foreign_cpu_share(before, cpu_snapshot())
    if foreign is not None:
        log(f"    other processes used {100 * foreign:.0f}% of the CPU during these runs")
    return times, results, foreign


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def child_memory(method: str, size: str, target: str, device: torch.device) -> dict[str, Any]:
    """In a fresh process: build model and input, reset the peak counter, run the method once, return the peak."""
    shape = SIZES[size]
    model = build_model(device)
    x = build_input(shape, device)
    seed = SEEDS[target](shape, device)
    runner = make_runners(method.startswith("zennit"))[method]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner(model, x, seed)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return {"peak_bytes": int(peak), "mode": "cuda max_memory_allocated", "before_bytes": int(before)}
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    mode = "VmHWM after clear_refs" + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else
                                       ", default malloc")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets the peak resident set size (VmHWM) to the current one
        before = _status_kib("VmRSS") * 1024
        runner(model, x, seed)
        peak = _status_kib("VmHWM") * 1024 - before
    except OSError:
        # ru_maxrss cannot be reset: the peak then includes whatever the set-up above needed (small here).
        mode = "getrusage ru_maxrss (clear_refs not writable; not reset)"
        try:
            before = _status_kib("VmRSS") * 1024
        except (OSError, RuntimeError):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        runner(model, x, seed)
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before
    return {"peak_bytes": int(peak), "mode": mode, "before_bytes": int(before)}


def measure_memory(method: str, size: str, target: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", f"{method}:{size}:{target}",
           "--threads", str(args.threads), "--device", args.device]
    env = dict(os.environ)
    if not args.malloc_default and sys.platform.startswith("linux"):
        # glibc raises its mmap threshold after the first large free and then keeps freed tensors in the heap; the
        # resident peak then depends on the allocation history and varied by up to 15 % between identical runs.
        # A fixed threshold returns every freed tensor to the OS at once: the peak is that of the live tensors.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"peak_bytes": None, "mode": "failed", "error": " | ".join(tail)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["child_seconds"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------------------------


def machine(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import captum

        captum_version = captum.__version__
    except Exception as error:  # pragma: no cover - captum is a dependency of the comparison
        captum_version = f"not importable ({type(error).__name__})"
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": None if mem_total is None else round(mem_total / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": captum_version,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------------------------
# The benchmark sections
# ----------------------------------------------------------------------------------------------------------------


def _judge(ratio: float | None, limit: float | None) -> bool | None:
    if limit is None or ratio is None:
        return None
    return ratio <= limit


def bench_engine(size: str, target: str, args: argparse.Namespace, device: torch.device, with_zennit: bool,
                 repeats: int) -> list[dict[str, Any]]:
    shape = SIZES[size]
    model = build_model(device)
    x = build_input(shape, device)
    seed = SEEDS[target](shape, device)
    runners = make_runners(with_zennit)
    fns = {name: (lambda r=runner: r(model, x, seed)) for name, runner in runners.items()}
    print(f"  [{size} {shape}, {target} target] timing {', '.join(fns)} ({repeats} repeat(s) after a warm-up)", flush=True)
    times, results, foreign = interleaved(fns, repeats, device, log=_log(args))
    del fns
    memory = {}
    if not args.no_memory:
        for name in runners:
            memory[name] = measure_memory(name, size, target, args)
            peak = memory[name]["peak_bytes"]
            shown = "failed: " + memory[name].get("error", "") if peak is None else f"{peak / MIB:.0f} MiB"
            print(f"    peak memory {name}: {shown}", flush=True)
    base_t = min(times["baseline"])
    base_m = memory.get("baseline", {}).get("peak_bytes")
    base_maps = results["baseline"]["maps"]
    rows = []
    for name in runners:
        t = min(times[name])
        peak = memory.get(name, {}).get("peak_bytes")
        t_ratio = t / base_t
        m_ratio = peak / base_m if peak is not None and base_m else None
        t_limit, m_limit = TARGETS[name]
        t_ok, m_ok = _judge(t_ratio, t_limit), _judge(m_ratio, m_limit)
        if t_limit is None:
            verdict = "-"
        elif t_ok and (m_ok or m_ok is None):
            verdict = "PASS" if m_ok is not None else "PASS(time; mem n/a)"
        else:
            failed = [what for what, ok in (("time", t_ok), ("mem", m_ok)) if ok is False]
            verdict = f"FAIL({'+'.join(failed)})"
        out = results[name]
        check: dict[str, Any] = {}
        if name == "gradient":
            scale = float(base_maps.abs().max()) or 1.0
            check["max_rel_diff_to_baseline"] = float((out["maps"] - base_maps).abs().max()) / scale
        if out.get("delta") is not None:
            expected = float(out["expected"].sum())
            check["delta"] = float(out["delta"].sum())
            check["expected"] = expected
            check["relative_delta"] = abs(check["delta"]) / abs(expected) if expected else None
        rows.append({
            "size": size, "target": target, "shape": list(shape), "method": name, "label": LABELS[name], "seconds": t,
            "all_seconds": times[name], "time_ratio": t_ratio, "peak_bytes": peak, "memory_ratio": m_ratio,
            "memory_mode": memory.get(name, {}).get("mode"), "time_target": t_limit, "memory_target": m_limit,
            "time_pass": t_ok, "memory_pass": m_ok, "verdict": verdict, "check": check,
            "foreign_cpu": foreign,
        })
    return rows


class ScoreModule(nn.Module):
    """captum's view of the task: the per-example score ``sum(seed * model(x))`` as an (N,) output.

    captum stacks ``internal_batch_size`` interpolated inputs along the batch axis; the seed (1, K, D, H, W)
    broadcasts over that expanded batch, so every row is scored with the same seed.
    """

    def __init__(self, model: nn.Module, seed: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.seed * self.model(x)).sum(dim=(1, 2, 3, 4))


def bench_ig(size: str, args: argparse.Namespace, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    from captum.attr import IntegratedGradients as CaptumIG

    shape = SIZES[size]
    model = build_model(device)
    x = build_input(shape, device)
    seed = box_seed(shape, device)
    wrapper = ScoreModule(model, seed).eval()
    captum_ig = CaptumIG(wrapper)
    baseline_x = torch.zeros_like(x)

    def run_captum(k: int, n_steps: int = IG_STEPS):
        def run():
            attr, delta = captum_ig.attribute(x, baselines=baseline_x, target=None, n_steps=n_steps,
                                              method=IG_METHOD, internal_batch_size=k,
                                              return_convergence_delta=True)
            return {"maps": attr, "delta": delta}
        return run

    ours = IntegratedGradients(n_steps=IG_STEPS, quadrature=IG_METHOD, baseline="zero",
                               internal_batch_size=None)

    def run_ours():
        out = ours.attribute(model, x, seed)
        return {"maps": out.maps, "delta": out.delta, "expected": out.expected,
                "internal_batch_size": ours.last_internal_batch_size}

    def warm_ours():
        # one chunk of the automatic batch size (and the end-point forward pass)
        return IntegratedGradients(n_steps=8, quadrature=IG_METHOD, baseline="zero",
                                   internal_batch_size=None).attribute(model, x, seed)

    fns: dict[str, Callable[[], Any]] = {f"captum_ibs{k}": run_captum(k) for k in CAPTUM_BATCHES}
    fns["segexplain_auto"] = run_ours
    # Warm-up: one internal batch of each configuration (a full IG run per configuration would double the cost).
    warmups: dict[str, Callable[[], Any]] = {f"captum_ibs{k}": run_captum(k, n_steps=max(k, 2)) for k in CAPTUM_BATCHES}
    warmups["segexplain_auto"] = warm_ours
    print(f"  [{size} {shape}] Integrated Gradients n_steps={IG_STEPS} {IG_METHOD}: captum internal_batch_size "
          f"{list(CAPTUM_BATCHES)} vs SegExplain automatic ({repeats} repeat(s) after a warm-up)", flush=True)
    times, results, foreign = interleaved(fns, repeats, device, warmups=warmups, log=_log(args))
    with torch.no_grad():
        score_x = float(wrapper(x).sum())
        score_0 = float(wrapper(baseline_x).sum())
    expected = score_x - score_0
    best_captum = min(min(times[f"captum_ibs{k}"]) for k in CAPTUM_BATCHES)
    best_k = min(CAPTUM_BATCHES, key=lambda k: min(times[f"captum_ibs{k}"]))
    ours_maps = results["segexplain_auto"]["maps"]
    rows = []
    for name in fns:
        t = min(times[name])
        out = results[name]
        delta = float(out["delta"].sum())
        row = {"size": size, "shape": list(shape), "method": name, "seconds": t, "all_seconds": times[name],
               "ratio_to_best_captum": t / best_captum, "delta": delta, "expected": expected,
               "relative_delta": abs(delta) / abs(expected) if expected else None, "foreign_cpu": foreign}
        if name == "segexplain_auto":
            row["internal_batch_size"] = out["internal_batch_size"]
            row["target"] = f"<= best captum (ibs={best_k})"
            row["pass"] = t <= best_captum
            row["verdict"] = "PASS" if row["pass"] else "FAIL"
            row["label"] = f"SegExplain IG auto (ibs={out['internal_batch_size']})"
        else:
            k = int(name.removeprefix("captum_ibs"))
            row["internal_batch_size"] = k
            row["target"] = ""
            row["verdict"] = "best" if k == best_k else ""
            row["label"] = f"captum IG ibs={k}"
            scale = float(out["maps"].abs().max()) or 1.0
            row["max_rel_diff_to_segexplain"] = float((out["maps"] - ours_maps).abs().max()) / scale
        rows.append(row)
    return rows


def bench_normalized(args: argparse.Namespace, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    size = "A"
    shape = SIZES[size]
    model = build_model(device)
    x = build_input(shape, device)
    spatial = shape[2:]
    start, stop = central_box(spatial, NORMALIZED_REGION)
    region_voxels = 1
    for a, b in zip(start, stop):
        region_voxels *= b - a
    target = BoxTarget(start, stop, class_index=1, aggregation="normalized")
    image = x[0]
    lrp = LRP(composite="epsilon_plus_flat")

    def run_exact():
        return explain(model, image, target, "lrp", device=device)

    # the first NAIVE_VOXELS voxels of the region in row-major order, one one-hot seed (one LRP pass) each
    voxels = [(start[0], start[1], start[2] + i) for i in range(NAIVE_VOXELS)]
    seeds = []
    for d, h, w in voxels:
        s = torch.zeros((1, 2, *spatial), device=device)
        s[0, 1, d, h, w] = 1.0
        seeds.append(s)

    def run_naive():
        return [lrp.attribute(model, x, s).maps for s in seeds]

    print(f"  [{size} {shape}] normalized aggregation, LRP epsilon_plus_flat, region {start}..{stop} "
          f"({region_voxels} voxels) vs {NAIVE_VOXELS} single-voxel passes ({repeats} repeat(s) after a warm-up)",
          flush=True)
    fns = {"explain_exact_normalized": run_exact, "naive_per_voxel": run_naive}
    # the naive loop is warmed up with one of its passes (same shapes and kernels), not all of them
    warmups = {"naive_per_voxel": lambda: lrp.attribute(model, x, seeds[0]).maps}
    times, results, foreign = interleaved(fns, repeats, device, warmups=warmups, log=_log(args))
    exact = results["explain_exact_normalized"]
    t_exact, t_naive = min(times["explain_exact_normalized"]), min(times["naive_per_voxel"])
    vps_exact, vps_naive = region_voxels / t_exact, NAIVE_VOXELS / t_naive
    speedup = vps_exact / vps_naive
    return [
        {"size": size, "method": "explain_exact_normalized", "label": "explain() exact normalized",
         "voxels": region_voxels, "seconds": t_exact, "all_seconds": times["explain_exact_normalized"],
         "voxels_per_second": vps_exact, "speedup": speedup, "target": f">= {NORMALIZED_TARGET:g}x naive",
         "pass": speedup >= NORMALIZED_TARGET, "verdict": "PASS" if speedup >= NORMALIZED_TARGET else "FAIL",
         "passes": exact.extras.get("passes"), "relative_delta": exact.relative_delta,
         "excluded_voxels": exact.extras.get("excluded_voxels"), "foreign_cpu": foreign},
        {"size": size, "method": "naive_per_voxel", "label": "naive: 1 LRP pass per voxel",
         "voxels": NAIVE_VOXELS, "seconds": t_naive, "all_seconds": times["naive_per_voxel"],
         "voxels_per_second": vps_naive, "speedup": 1.0, "target": "", "verdict": "", "foreign_cpu": foreign},
    ]


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    if args.verbose:
        return lambda line: print(line, flush=True)
    return lambda line: None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


BUSY_WARNING = 0.10  # other processes above this share of the CPU make a section's times unreliable


def _busy(share: float | None) -> str:
    if share is None:
        return "n/a"
    return f"{100 * share:.0f}%" + (" (!)" if share > BUSY_WARNING else "")


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["SegExplain engine benchmark",
             f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gib']} GiB; "
             f"python {m['python']}, torch {m['torch']}, captum {m['captum']}; threads {m['threads']}; "
             f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
             f"load average at start: {m['load_average_start']}, at end: {report.get('load_average_end')}",
             "model: reference_unet() (6 in, 2 classes, base 16, depth 4, BatchNorm randomized), float32, eval; "
             "seeds (sections 1-3): box = sum of class-1 logits over a central box (a quarter of each axis), "
             "class = sum over the whole class-1 channel",
             f"timing: warm-up once, best of {report['config']['repeats']} interleaved runs "
             f"(size L: {report['config']['repeats_l']}; IG: {report['config']['ig_repeats']}); "
             f"peak memory: fresh subprocess per (method, size), {report.get('memory_mode') or 'not measured'}",
             ""]
    if report["engine"]:
        rows = []
        for r in report["engine"]:
            if r["time_target"] is None:
                target = "~1x (info)" if r["method"] == "gradient" else ("" if r["method"] == "baseline" else "info")
            else:
                target = f"t<={r['time_target']:g}x m<={r['memory_target']:g}x"
            check = r["check"]
            if "relative_delta" in check and check["relative_delta"] is not None:
                note = f"rel. delta {check['relative_delta']:.1e}"
            elif "max_rel_diff_to_baseline" in check:
                note = f"max diff {check['max_rel_diff_to_baseline']:.1e}"
            else:
                note = ""
            rows.append([r["size"], r["target"], r["label"], _fmt(r["seconds"], ".3f"),
                         _fmt(r["time_ratio"], ".2f", "x"),
                         _fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / MIB, ".0f"),
                         _fmt(r["memory_ratio"], ".2f", "x"), target, r["verdict"], note, _busy(r["foreign_cpu"])])
        lines.append("1-3. One explanation vs one input gradient (ratios to the baseline of the same size and target)")
        lines.append(table(["size", "seed", "method", "seconds", "t ratio", "peak MiB", "mem ratio", "target",
                            "result", "check", "other CPU"], rows, right={3, 4, 5, 6, 10}))
        lines.append("")
    if report["ig"]:
        rows = []
        for r in report["ig"]:
            rows.append([r["size"], r["label"], _fmt(r["seconds"], ".2f"), _fmt(r["ratio_to_best_captum"], ".2f", "x"),
                         f"{r['delta']:+.3e}", _fmt(r["relative_delta"], ".1e"), r["target"], r["verdict"]])
        lines.append(f"4. Integrated Gradients, n_steps={IG_STEPS}, {IG_METHOD} (delta: captum's convergence delta / "
                     "our completeness delta, sum(maps) - (score(x) - score(0)))")
        lines.append(table(["size", "method", "seconds", "vs best captum", "delta", "rel. delta", "target", "result"],
                           rows, right={2, 3, 4, 5}))
        for size in dict.fromkeys(r["size"] for r in report["ig"]):
            share = next(r["foreign_cpu"] for r in report["ig"] if r["size"] == size)
            lines.append(f"   other processes used {_busy(share)} of the CPU during the timed IG runs at {size}")
        lines.append("")
    if report["normalized"]:
        rows = []
        for r in report["normalized"]:
            rows.append([r["size"], r["label"], str(r["voxels"]), _fmt(r["seconds"], ".2f"),
                         _fmt(r["voxels_per_second"], ".1f"), _fmt(r["speedup"], ".1f", "x"), r["target"],
                         r["verdict"]])
        lines.append("5. Normalized aggregation throughput (output voxels explained per second, LRP epsilon_plus_flat)")
        lines.append(table(["size", "method", "voxels", "seconds", "voxels/s", "speedup", "target", "result"],
                           rows, right={2, 3, 4, 5}))
        exact = report["normalized"][0]
        lines.append(f"   exact path: {exact['passes']} passes, relative delta {_fmt(exact['relative_delta'], '.1e')}, "
                     f"{exact['excluded_voxels']} voxels excluded; other processes used "
                     f"{_busy(exact['foreign_cpu'])} of the CPU during these runs")
        lines.append("")
    lines.append("6. zennit: " + report["zennit"]["note"])
    failed = report["failed"]
    lines.append("")
    shares = [r.get("foreign_cpu") for key in ("engine", "ig", "normalized") for r in report[key]]
    if any(share is not None and share > BUSY_WARNING for share in shares):
        lines.append(f"(!) other processes used more than {100 * BUSY_WARNING:.0f}% of the CPU while these rows were "
                     "timed: their times and ratios are not reliable; rerun on an idle machine")
    lines.append("targets failed: " + (", ".join(failed) if failed else "none"))
    lines.append(f"wall time: {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def _sizes(value: str) -> list[str]:
    sizes = [s.strip().upper() for s in value.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise argparse.ArgumentTypeError(f"sizes must be a comma-separated subset of {','.join(SIZES)}, got {value!r}")
    return sizes


def _targets(value: str) -> list[str]:
    targets = [t.strip().lower() for t in value.split(",") if t.strip()]
    if not targets or any(t not in SEEDS for t in targets):
        raise argparse.ArgumentTypeError(f"targets must be a comma-separated subset of {','.join(SEEDS)}, "
                                         f"got {value!r}")
    return targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_sizes, default=_sizes("A,M,L"),
                        help="input sizes for sections 1-3: A=(1,6,19,48,48), M=(1,6,32,96,96), L=(1,6,64,128,128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the best is kept")
    parser.add_argument("--repeats-l", type=int, default=None,
                        help="timed runs at size L (default: --repeats; lower it to shorten a run on a slow machine)")
    parser.add_argument("--ig-repeats", type=int, default=None,
                        help="timed runs of each IG configuration (default: --repeats; one IG run is 32 gradient "
                             "passes)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--targets", type=_targets, default=_targets("box,class"),
                        help="seeds of sections 1-3: box (a central box, a quarter of each axis) and/or class (the "
                             "whole class channel)")
    parser.add_argument("--ig-sizes", type=_sizes, default=_sizes("A"), help="sizes of the IG comparison (A,M)")
    parser.add_argument("--quick", action="store_true", help="smoke test: size A only, one repeat")
    parser.add_argument("--no-ig", action="store_true", help="skip the Integrated Gradients comparison")
    parser.add_argument("--no-normalized", action="store_true", help="skip the normalized-aggregation throughput")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child-timeout", type=int, default=900, help="seconds allowed to one memory subprocess")
    parser.add_argument("--malloc-default", action="store_true",
                        help="measure peak memory with glibc's default (dynamic) mmap threshold instead of a fixed "
                             f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in the memory subprocesses")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every warm-up and timed run")
    parser.add_argument("--child-memory", metavar="METHOD:SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.ig_sizes, args.repeats, args.repeats_l, args.ig_repeats = ["A"], ["A"], 1, 1, 1
    if args.repeats_l is None:
        args.repeats_l = args.repeats
    if args.ig_repeats is None:
        args.ig_repeats = args.repeats
    for name in ("repeats", "repeats_l", "ig_repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda was requested but CUDA is not available here", file=sys.stderr)
        return 2
    if args.child_memory:
        method, size, target = args.child_memory.split(":")
        print(json.dumps(child_memory(method, size, target, device)))
        return 0

    started = time.perf_counter()
    with_zennit, zennit_detail = zennit_status()
    info = machine(args, device)
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, captum {info['captum']}, "
          f"threads {info['threads']}, device {info['device']}; load average {info['load_average_start']}",
          flush=True)
    report: dict[str, Any] = {
        "machine": info,
        "config": {"sizes": args.sizes, "targets": args.targets, "ig_sizes": [] if args.no_ig else args.ig_sizes, "repeats": args.repeats,
                   "repeats_l": args.repeats_l, "ig_repeats": args.ig_repeats, "threads": args.threads,
                   "device": args.device, "ig_steps": IG_STEPS, "ig_method": IG_METHOD,
                   "captum_batches": list(CAPTUM_BATCHES), "normalized_region": list(NORMALIZED_REGION),
                   "naive_voxels": NAIVE_VOXELS, "quick": args.quick, "memory": not args.no_memory,
                   "malloc_default": args.malloc_default},
        "engine": [], "ig": [], "normalized": [],
    }
    for size in args.sizes:
        repeats = args.repeats_l if size == "L" else args.repeats
        for target in args.targets:
            report["engine"] += bench_engine(size, target, args, device, with_zennit, repeats)
    if not args.no_ig:
        for size in args.ig_sizes:
            report["ig"] += bench_ig(size, args, device, args.ig_repeats)
    if not args.no_normalized:
        report["normalized"] = bench_normalized(args, device, args.repeats)

    if with_zennit:
        note = (f"{zennit_detail} timed above (EpsilonPlusFlat with SequentialMergeBatchNorm); the issue reports "
                f"{ISSUE_ZENNIT}.")
    else:
        note = (f"not importable here ({zennit_detail}); zennit needs torchvision, which is broken/absent with "
                f"torch {torch.__version__} on this machine. The issue's zennit figures ({ISSUE_ZENNIT}) were "
                "measured by the project founders elsewhere, not in this run.")
    report["zennit"] = {"importable": with_zennit, "detail": zennit_detail, "note": note}
    modes = {r["memory_mode"] for r in report["engine"] if r.get("memory_mode")}
    report["memory_mode"] = ", ".join(sorted(modes)) if modes else None
    failed = [f"{r['size']} {r['target']} {r['label']} ({r['verdict']})" for r in report["engine"]
              if r["verdict"].startswith("FAIL")]
    failed += [f"{r['size']} {r['label']}" for r in report["ig"] if r["verdict"] == "FAIL"]
    failed += [f"{r['size']} {r['label']}" for r in report["normalized"] if r["verdict"] == "FAIL"]
    report["failed"] = failed
    report["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["wall_seconds"] = time.perf_counter() - started
    print()
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
