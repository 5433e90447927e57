"""Which kernels the engine's convolutions run on.

PyTorch sends float32 CPU convolutions with a batch of one and few channels times slices (N*C*D*H <= 20480: every
layer of the reference U-Net at size A, the deepest ones at L) to a reference kernel that was 16x slower than oneDNN
on the project's machine. The LRP rules call oneDNN themselves
(:func:`SegExplainLib.engine.rules.affine.affine_forward`). The methods that run the user's own model through autograd
(gradient, IG, SmoothGrad, Guided Backprop, ...) get the same kernels from :func:`onednn_convolutions`, which
reroutes the model's convolution calls while it is active. The results agree with torch's own kernels to float32
rounding (tested); float64, other devices, "same" padding and other cases stay with torch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["onednn_convolutions", "onednn_eligible"]


def onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` with ``weight`` can go to oneDNN directly (float32 on CPU, 2D or 3D)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and
            torch.backends.mkldnn.is_available() and x.dim() in (4, 5))


def _per_dim(value: int | tuple[int, ...] | list[int], dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


_CONVOLUTIONS = {F.conv2d: 2, F.conv3d: 3}
_PARAMETERS = ("bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = (None, 1, 0, 1, 1)


class _OneDNNRouting(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dims = _CONVOLUTIONS.get(func)
        if dims is not None and len(args) >= 2 and onednn_eligible(args[0], args[1]):
            bias, stride, padding, dilation, groups = (
                args[2 + i] if len(args) > 2 + i else kwargs.get(name, default)
                for i, (name, default) in enumerate(zip(_PARAMETERS, _DEFAULTS)))
            if not isinstance(padding, str):
                return torch.mkldnn_convolution(args[0], args[1], bias, _per_dim(padding, dims),
                                                _per_dim(stride, dims), _per_dim(dilation, dims), groups)
        if func is F.conv_transpose3d and args and args[0].device.type == "cpu" and args[0].dim() == 5:
            # oneDNN's 3D transposed convolution is several times faster on a channels-last input
            args = (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])
        return func(*args, **kwargs)


_state = threading.local()  # torch function modes are per thread, and so is this flag


@contextlib.contextmanager
def onednn_convolutions() -> Iterator[None]:
    """Run the model's float32 CPU convolutions on oneDNN inside a ``with`` block (nested uses are no-ops)."""
    if getattr(_state, "routing", False):
        yield
        return
    _state.routing = True
    try:
        with _OneDNNRouting():
            yield
    finally:
        _state.routing = False
