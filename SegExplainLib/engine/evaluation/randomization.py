"""Sanity: cascading randomization of the model's parameters from the output layer down (Adebayo et al. 2018).

A copy of the model is randomized layer group by layer group, starting at the output; after each stage the map is
computed again and compared with the trained network's by the Spearman rank correlation of their block sums
(:func:`~SegExplainLib.engine.evaluation.faithfulness.block_sums`). A map that explains the network must change once
the weights it explains are gone: a method passes when the correlation after the last stage (every layer random) is
below a threshold. The user's model is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy

import numpy as np
import torch
from torch import nn

from ...errors import SegExplainError

__all__ = ["cascade", "parameter_layers", "spearman"]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two arrays of the same size (0.0 when one of them is constant)."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / norm) if norm > 0 else 0.0


def parameter_layers(model: nn.Module) -> list[str]:
    """The names of the modules that hold parameters of their own, from the output back to the input (the reverse
    of ``named_modules``' order, which follows the definition and, in the usual networks, the forward pass)."""
    names = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    if not names:
        raise SegExplainError("the model has no parameters to randomize")
    return names[::-1]


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Draws every parameter anew from a normal law with the parameter's own mean and standard deviation."""
    for parameter in module.parameters(recurse=False):
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
        spread = float(parameter.double().std()) if parameter.numel() > 1 else abs(float(parameter.double()))
        parameter.copy_((noise * (spread or 1.0) + float(parameter.double().mean())).to(parameter))


def cascade(model: nn.Module, stages: int, seed: int) -> Iterator[tuple[str, nn.Module]]:
    """A copy of ``model`` randomized in ``stages`` cumulative groups of layers from the output down.

    Yields, per stage, the name of the deepest layer randomized so far and the copy (the same object each time,
    randomized further).
    """
    layers = parameter_layers(model)
    with torch.no_grad():  # not around the yield: grad mode would stay off in the caller while this waits
        copy = deepcopy(model)
    modules = dict(copy.named_modules())
    generator = torch.Generator().manual_seed(seed)
    cuts = np.unique(np.linspace(0, len(layers), min(stages, len(layers)) + 1).round().astype(int))[1:]
    done = 0
    for cut in cuts:
        with torch.no_grad():
            for name in layers[done:cut]:
                _randomize(modules[name], generator)
        done = cut
        yield layers[cut - 1], copy
