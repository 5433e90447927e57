"""Weights: a state dict from ``.pt``/``.pth`` (no code runs) or ``.safetensors``, loaded strictly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...errors import SegExplainError
from .checks import existing_file, one_line

#: Weight file extensions that :func:`load_weights` reads.
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")

_MAX_KEYS_SHOWN = 3

def _show_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else "")

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = existing_file(path, "weights file", WEIGHT_SUFFIXES)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise SegExplainError(
                f"weights file {str(path)!r} needs the package safetensors, which is not installed; "
                f"install it with pip install safetensors"
            ) from error
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:
            raise SegExplainError(f"reading safetensors file {str(path)!r} failed: {one_line(error)}") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SegExplainError(
            f"weights file {str(path)!r} is not a plain state dict (torch.load weights_only=True refused it: "
            f"{one_line(error)}); if it holds a whole pickled model, use --model pickle:{path} with --trust-model-code"
        ) from error
    # Training checkpoints often wrap the state dict: {"state_dict": {...}, "epoch": ...}; MONAI's checkpoint
    # saver writes {"model": {...}, "optimizer": ...}.
    wrapper = next((k for k in ("state_dict", "model") if isinstance(loaded, Mapping)
                    and isinstance(loaded.get(k), Mapping)), None)
    if wrapper is not None:
        loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise SegExplainError(
            f"weights file {str(path)!r} holds a {type(loaded).__name__} that is not a state dict; "
            f"expected a mapping of parameter names to tensors"
        )
    return dict(loaded)


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """Load a state dict from ``.pt``/``.pth`` (no code runs) or ``.safetensors`` into ``model``, strictly.

    A ``{"state_dict": {...}}`` or ``{"model": {...}}`` (MONAI) checkpoint is unwrapped, and a ``module.`` prefix on
    every key (``DataParallel``) is dropped when the model's keys lack it.

    Args:
        model: The network; its parameters and buffers are overwritten in place.
        weights: The weights file.

    Returns:
        ``model``.

    Raises:
        SegExplainError: The file is missing, of another type, not a state dict, or its keys or shapes differ from
            the model's (the message names the first few).
    """
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    expected = model.state_dict()
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        state = {k[len(prefix):]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_show_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_show_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch {_show_keys(wrong_shape)}")
    if problems:
        raise SegExplainError(
            f"weights file {str(path)!r} does not match {type(model).__name__}: {'; '.join(problems)}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as error:
        raise SegExplainError(f"loading weights file {str(path)!r} failed: {one_line(error)}") from error
    return model
