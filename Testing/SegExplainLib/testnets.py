"""Helpers shared by the test files."""

from __future__ import annotations

from torch import nn


def frozen(model: nn.Module) -> nn.Module:
    """The model in eval mode with parameters that do not require grad, as explain() runs it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
