"""The checks, and the batched forward and backward passes, that every gradient method shares."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ...errors import SegExplainError
from ..baselines import Baseline, make_baseline
from ..batching import check_batch_option, choose_internal_batch_size, max_batch_for
from ..kernels import onednn_convolutions


def check_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise SegExplainError(f"inputs must be a torch.Tensor (B, C, D, H, W), got {type(inputs).__name__}")
    if inputs.dim() != 5:
        raise SegExplainError(f"inputs must have shape (B, C, D, H, W), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise SegExplainError(f"inputs must be a floating point tensor, got dtype {inputs.dtype}")
    if inputs.numel() == 0:
        raise SegExplainError(f"inputs must not be empty, got shape {tuple(inputs.shape)}")
    return inputs.detach()


def check_seed(seed: Any, inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(seed, torch.Tensor):
        raise SegExplainError(f"seed must be a torch.Tensor shaped like the model output, got {type(seed).__name__}")
    if seed.device != inputs.device:
        raise SegExplainError(f"seed is on device {seed.device}, expected the inputs' device {inputs.device}")
    if not seed.is_floating_point():
        seed = seed.to(inputs.dtype)
    return seed


def check_output(out: Any, seed: torch.Tensor, batch: int) -> torch.Tensor:
    """Check a (chunk of) model output against the seed; ``batch`` is the batch size of the full inputs."""
    if not isinstance(out, torch.Tensor):
        raise SegExplainError(f"model output must be a tensor (B, K, D, H, W), got {type(out).__name__}")
    expected = (batch,) + tuple(out.shape[1:])
    if tuple(seed.shape) != expected:
        raise SegExplainError(
            f"seed shape {tuple(seed.shape)} does not match the model output shape {expected}"
        )
    return out


def seed_scores(seed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-row score ``sum(seed * out)`` over all but the batch dimension."""
    return (seed * out).flatten(1).sum(1)


def chunks(total: int, size: int) -> Iterator[range]:
    """Split ``range(total)`` into ``ceil(total / size)`` consecutive chunks of nearly equal length (<= ``size``).

    Balanced rather than ``size, size, ..., rest``: a small last chunk (batch 1 in the worst case) would run the
    slow batch-1 CPU convolution kernels.
    """
    n_chunks = -(-total // size)
    base, extra = divmod(total, n_chunks) if n_chunks else (0, 0)
    start = 0
    for i in range(n_chunks):
        stop = start + base + (1 if i < extra else 0)
        yield range(start, stop)
        start = stop


def forward_no_grad(model: torch.nn.Module, batch: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad(), onednn_convolutions():
        outs = [model(batch[r.start : r.stop]) for r in chunks(batch.shape[0], size)]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        bad = next(o for o in outs if not isinstance(o, torch.Tensor))
        raise SegExplainError(f"model output must be a tensor (B, K, D, H, W), got {type(bad).__name__}")
    return torch.cat(outs, dim=0)


def input_gradient(
    model: torch.nn.Module,
    x: torch.Tensor,
    seed: torch.Tensor,
    b_idx: torch.Tensor | None,
    batch: int,
    create_graph: bool,
    *,
    with_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """d/dx of sum(seed[b_idx] * model(x)) for a batch of rows ``x`` (``b_idx``: the batch element of each row,
    ``None`` when ``x`` is the whole input batch); checks the full ``seed`` against the output shape. With
    ``with_scores``, also each row's score ``sum(seed * model(x))`` (detached), which the same pass computed."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), onednn_convolutions():
        out = check_output(model(x), seed, batch)
        rows = seed if b_idx is None else seed[b_idx]
        scores = seed_scores(rows, out)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=create_graph)
    grad = grad if create_graph else grad.detach()
    return (grad, scores.detach()) if with_scores else grad


def set_batching(method: Any, internal_batch_size: Any, memory_budget_bytes: Any) -> None:
    """Validate and store the batching options shared by the multi-pass methods."""
    check_batch_option("internal_batch_size", internal_batch_size)
    check_batch_option("memory_budget_bytes", memory_budget_bytes)
    method.internal_batch_size = internal_batch_size
    method.memory_budget_bytes = memory_budget_bytes
    method.last_internal_batch_size = None
    method._probed = None  # (model, sample shape, dtype, device) and the batch the memory probe chose for them


def resolve_batch(
    method: Any, model: torch.nn.Module, inputs: torch.Tensor, total: int, *, forward_only: bool = False
) -> int:
    """Internal batch size for ``total`` passes: the option, or the memory-budget choice; never above ``total``.
    ``forward_only`` passes (no backward) take the higher cap of :func:`~SegExplainLib.engine.batching.max_batch_for`.

    The choice runs a forward and backward pass of one sample; it is made once per model and sample shape and
    reused by the later calls of the same method (the passes of a normalized aggregation, the voxel batches).
    """
    k = method.internal_batch_size
    if k is None:
        if total <= 1:
            k = 1
        else:
            key = (weakref.ref(model), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
            if method._probed is None or method._probed[0] != key:
                budget = method.memory_budget_bytes
                method._probed = (key, choose_internal_batch_size(
                    model, inputs[:1], memory_budget_bytes=budget,
                    max_batch=max_batch_for(budget, inputs.device, forward_only=forward_only)))
            k = method._probed[1]
    k = max(1, min(int(k), total))
    method.last_internal_batch_size = k
    return k


def coerce_baseline(value: Any, option: str = "baseline") -> Baseline:
    try:
        return make_baseline(value)
    except SegExplainError as exc:
        raise SegExplainError(f"{option}: {exc}") from None


def baseline_of(x: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """The baseline of ``x`` in its type and on its device, checked against its shape."""
    x0 = baseline(x).to(dtype=x.dtype, device=x.device)
    if x0.shape != x.shape:
        msg = f"baseline shape {tuple(x0.shape)} does not match the inputs shape {tuple(x.shape)}"
        raise SegExplainError(msg)
    return x0


def accumulate(acc: torch.Tensor, index: torch.Tensor, values: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if create_graph:
        return acc.index_add(0, index, values)
    return acc.index_add_(0, index, values.detach())
