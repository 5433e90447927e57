"""Choice of the internal batch size of the multi-pass methods (Integrated Gradients, SmoothGrad, Occlusion).

These methods run the network on many perturbed copies of one input; stacking ``k`` copies along the batch
dimension per forward/backward pass is much faster than one at a time (on CPU a batch-1 float32 ``Conv3d`` falls
back to a slow non-oneDNN kernel while batch >= 2 uses oneDNN), but memory grows linearly with ``k``.

:func:`choose_internal_batch_size` measures what one sample costs and picks the largest ``k`` that fits a memory
budget:

* **Per-sample cost.** One forward and backward pass of one sample is run. Its cost is the larger of two figures:
  the bytes autograd saves for the backward pass (distinct storages, parameters and buffers excluded since they do
  not grow with the batch, plus the output, the input and its gradient) times :data:`SAFETY_FACTOR`, and, where it
  can be read, the memory the pass really added at its peak (CUDA's allocator peak; on Linux the resident-set
  high-water mark, reset through ``/proc/self/clear_refs``) plus :data:`MEASURED_MARGIN` for the method's own
  copies of the input. The measurement counts what the saved-tensor figure misses (transient buffers of the
  backward pass, kernel workspaces); it is taken when the saved-tensor figure reaches :data:`MEASURED_FROM_BYTES`,
  below which page-size noise would dominate it.
* **Budget.** ``memory_budget_bytes`` when given; otherwise on CUDA 50 % of the free device memory
  (``torch.cuda.mem_get_info``), on CPU 25 % of ``MemAvailable`` from ``/proc/meminfo`` (or
  :data:`FALLBACK_CPU_BUDGET_BYTES` when that file cannot be read, e.g. on macOS or Windows).
* **Choice.** ``k = min(budget // per_sample, max_batch)``, at least 1; any integer, not only powers of two. The
  probe is exactly one input's forward and backward pass, what a plain gradient costs, and never more; so is
  ``k = 1``. The budget chooses how many inputs share a pass beyond that, it does not forbid the method: an input
  that alone needs more than the budget runs one at a time, like a gradient of it (issues 18 and 22).

Speed note (measured on a 2-core CPU with ``bench/bench_engine.py``): IG on a ``(1, 6, 19, 48, 48)`` input was
fastest with an internal batch of 2 (batch 2 already takes PyTorch's fast oneDNN convolutions) and 15-20 % slower at
4 to 8 (cache pressure), so on CPU the methods cap the automatic choice at :data:`DEFAULT_MAX_BATCH` = 2 when no
budget is given; on CUDA, and whenever the caller states a budget, up to :data:`BUDGETED_MAX_BATCH` = 16
(:func:`max_batch_for`). Forward passes without a backward pass (occlusion, the perturbation methods, the scorecard's
curves) keep getting cheaper per image up to batch 8 on a 2-core CPU (the demo network: 0.17, 0.14 and 0.09 CPU
seconds per image at batch 2, 4 and 8, docs/benchmarks.md), so their cap there is :data:`FORWARD_ONLY_MAX_BATCH` = 8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SegExplainError
from .checks import is_int

__all__ = [
    "choose_internal_batch_size",
    "estimate_sample_bytes",
    "default_memory_budget",
    "max_batch_for",
    "check_batch_option",
    "DEFAULT_MAX_BATCH",
    "FORWARD_ONLY_MAX_BATCH",
    "BUDGETED_MAX_BATCH",
]

SAFETY_FACTOR = 1.5
MEASURED_MARGIN = 1.1
MEASURED_FROM_BYTES = 16 * 1024**2
DEFAULT_MAX_BATCH = 2
FORWARD_ONLY_MAX_BATCH = 8
BUDGETED_MAX_BATCH = 16
FALLBACK_CPU_BUDGET_BYTES = 2 * 1024**3
CPU_BUDGET_FRACTION = 0.25
CUDA_BUDGET_FRACTION = 0.5


def check_batch_option(name: str, value: object) -> None:
    """Validate an ``internal_batch_size`` / ``memory_budget_bytes`` option: ``None`` or an int >= 1."""
    if value is not None and (not is_int(value) or value < 1):  # type: ignore[operator]
        raise SegExplainError(f"{name} must be None or an integer >= 1, got {value!r}")


def max_batch_for(memory_budget_bytes: int | None, device: torch.device | str = "cpu", *,
                  forward_only: bool = False) -> int:
    """Cap of the automatic choice: on CPU without a stated budget 2 (its sweet spot), or 8 for passes that run
    forward only; else 16."""
    if memory_budget_bytes is None and torch.device(device).type == "cpu":
        return FORWARD_ONLY_MAX_BATCH if forward_only else DEFAULT_MAX_BATCH
    return BUDGETED_MAX_BATCH


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    parts = line.split()
                    return int(parts[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_memory_budget(device: torch.device) -> int:
    """Bytes the internal batch may use on ``device`` when the caller gives no budget (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(CUDA_BUDGET_FRACTION * free))
    available = _mem_available_bytes()
    if available is None:
        return FALLBACK_CPU_BUDGET_BYTES
    return max(1, int(CPU_BUDGET_FRACTION * available))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{field} is not in /proc/self/status")


def added_peak_bytes(run: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory that ``run()`` adds on ``device``, or ``None`` where it cannot be read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets the resident-set high-water mark (VmHWM) to the current size
        before = _status_bytes("VmRSS")
    except OSError:
        run()
        return None
    run()
    return max(0, _status_bytes("VmHWM") - before)


def estimate_sample_bytes(model: torch.nn.Module, sample: torch.Tensor) -> int:
    """Estimated peak bytes of one forward+backward pass per batch element of ``sample`` (first element used)."""
    if not isinstance(sample, torch.Tensor) or sample.dim() < 2 or sample.shape[0] < 1:
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise SegExplainError(f"sample must be a tensor (B, C, ...) with B >= 1, got {shape}")
    probe = sample[:1].detach().clone().requires_grad_(True)
    constant = {p.untyped_storage().data_ptr() for p in model.parameters()}
    constant |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}
    out_bytes = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in constant and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensor subclasses
            seen[id(t)] = t.numel() * t.element_size()
        return t

    def forward_and_backward() -> None:
        nonlocal out_bytes
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(probe)
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        out_bytes = sum(o.numel() * o.element_size() for o in outputs)
        scalar = sum(o.float().sum() for o in outputs if o.requires_grad)
        if isinstance(scalar, torch.Tensor):
            torch.autograd.grad(scalar, probe, allow_unused=True)

    measured = added_peak_bytes(forward_and_backward, probe.device)
    saved = SAFETY_FACTOR * (sum(seen.values()) + out_bytes + 2 * probe.numel() * probe.element_size())
    if measured is not None and saved >= MEASURED_FROM_BYTES:
        return max(1, int(max(saved, MEASURED_MARGIN * measured)))
    return max(1, int(saved))


def choose_internal_batch_size(
    model: torch.nn.Module,
    sample: torch.Tensor,
    *,
    memory_budget_bytes: int | None,
    max_batch: int = 16,
) -> int:
    """Largest batch ``k`` in ``[1, max_batch]`` whose estimated forward+backward memory fits the budget (1 when
    even one input does not: one input's pass is a gradient's, which the budget does not forbid).

    Args:
        model: The network (eval mode).
        sample: An input batch; its first element is the probe.
        memory_budget_bytes: Budget in bytes; ``None`` means :func:`default_memory_budget` of the sample's device.
        max_batch: Upper bound of the result (methods pass :func:`max_batch_for` of their budget).
    """
    check_batch_option("memory_budget_bytes", memory_budget_bytes)
    if not is_int(max_batch) or max_batch < 1:
        raise SegExplainError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    per_sample = estimate_sample_bytes(model, sample)
    budget = memory_budget_bytes if memory_budget_bytes is not None else default_memory_budget(sample.device)
    return int(max(1, min(max_batch, budget // per_sample)))
