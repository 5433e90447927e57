"""Methods that run the model's backward pass with rules attached: LRP, Guided Backprop and Deconvolution."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SegExplainError
from .composites import DECONVOLUTION, GUIDED_BACKPROP, Composite, get_composite
from .deployment import check_walkable
from .filters import AmplitudeFilter
from .kernels import onednn_convolutions
from .method import AttributionMethod, AttributionOutput
from .rules.base import PropagationContext
from .rules.window import box_share

# explained outputs within a box of at most this share of the output grid count as a small target
SPARSE_SEED_SHARE = 0.25


def _small_target(seed: torch.Tensor) -> bool:
    """Whether the rules may work on the box of the explained outputs only (a seed that is differentiated, as in
    the normalized aggregation, needs the whole backward pass anyway)."""
    return not seed.requires_grad and seed.dim() > 2 and box_share(seed) <= SPARSE_SEED_SHARE


def check_logits(logits: Any, seed: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The model output as logits shaped like ``seed``; a clear error for anything else."""
    if not isinstance(logits, torch.Tensor):
        msg = f"the model must return a logits tensor (N, K, D, H, W), got {type(logits).__name__}"
        raise SegExplainError(msg)
    if logits.shape != seed.shape:
        msg = (f"model output has shape {tuple(logits.shape)} but (N, K, *spatial) = {tuple(seed.shape)} was "
               f"expected for input {tuple(inputs.shape)}")
        raise SegExplainError(msg)
    return logits


class _RuleMethod(AttributionMethod):
    """Shared body: attach a composite, run forward and the modified backward, read the input relevance."""

    composite: Composite
    relevance_times_input: bool
    walks_modules = True
    seed_local = True

    def attribute(self, model: nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        output, _ = self._propagate(model, inputs, seed, ())
        return output

    def attribute_layers(self, model: nn.Module, inputs: torch.Tensor, seed: torch.Tensor,
                         layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The signal at the outputs of named layers: relevance for LRP, the modified gradient for GBP/Deconv.

        Args:
            layers: Names from ``model.named_modules()``, e.g. ``["encoder.0", "bottleneck", "decoder.2"]``.

        Returns:
            Per layer name, a tensor shaped like that layer's output (B, C_l, *spatial_l).
        """
        _, signals = self._propagate(model, inputs, seed, layers)
        return signals

    def _propagate(self, model, inputs, seed, layers):
        with self._forward(model, inputs, layers, seed) as (_, backward):
            return backward(seed)

    @contextlib.contextmanager
    def seeded_by_output(self, model: nn.Module, inputs: torch.Tensor,
                         ) -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor], AttributionOutput]]]:
        """Run the wired forward pass, yield its logits (detached) and ``finish(seed)``, which explains a seed.

        A seed read off the prediction (a predicted region) then needs no forward pass of its own. The rules'
        forward passes run the layers' own functions (z+ too, while it does not know the seed), so the logits are
        the plain model's (to rounding where a canonizer merges a batch norm into a convolution).
        """
        with self._forward(model, inputs, ()) as (logits, backward):
            yield logits.detach(), lambda seed: backward(seed)[0]

    @contextlib.contextmanager
    def _forward(self, model, inputs, layers, seed=None):
        """The wired forward pass of ``inputs``: yields its logits and ``backward(seed) -> (output, signals)``.

        Without ``seed`` the rules do not yet know whether the target is small: ``ZPlus`` then leaves all it can to
        the backward pass, which gets the seed.
        """
        check_walkable(model, self.name)
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name not in modules or name == ""]
        if unknown:
            valid = [name for name in modules if name][:8]
            msg = f"unknown layer name(s) {unknown}; valid names include {valid}"
            raise SegExplainError(msg)
        x = inputs.detach().requires_grad_(True)
        sink = torch.zeros_like(x, requires_grad=True)
        ctx = PropagationContext(network_input=x, input_sink=sink, layer_filter=self._layer_filter(),
                                 sparse_relevance=None if seed is None else _small_target(seed))
        captured: dict[str, torch.Tensor] = {}
        handles = [modules[name].register_forward_hook(_capture(captured, name)) for name in layers]

        def backward(seed):
            logits_checked = check_logits(logits, seed, inputs)
            ctx.sparse_relevance = _small_target(seed)
            grads = torch.autograd.grad(logits_checked, (x, sink, *captured.values()), grad_outputs=seed,
                                        allow_unused=True, create_graph=seed.requires_grad)
            missing = [name for name in layers if name not in captured]
            if missing:
                msg = f"layer(s) {missing} did not run in the forward pass (merged into a convolution, or unused)"
                raise SegExplainError(msg)
            grad_x, grad_sink = grads[:2]
            signals = {}
            for (name, tensor), grad in zip(captured.items(), grads[2:]):
                grad = torch.zeros_like(tensor) if grad is None else grad
                signals[name] = tensor.detach() * grad if self.relevance_times_input else grad
            return self._maps(x, grad_x, grad_sink, seed, logits), signals

        try:
            with onednn_convolutions(), self.composite.attached(model, ctx) as forward:
                logits = forward(x)
                yield logits, backward
        finally:
            for handle in handles:
                handle.remove()

    def _maps(self, x, grad_x, grad_sink, seed, logits) -> AttributionOutput:
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        maps = x.detach() * grad_x if self.relevance_times_input else grad_x
        if grad_sink is not None:
            maps = maps + grad_sink
        if not self.relevance_times_input:
            return AttributionOutput(maps)
        expected = (seed * logits.detach()).flatten(1).sum(1)
        return AttributionOutput(maps, delta=maps.detach().flatten(1).sum(1) - expected.detach(), expected=expected)

    def _layer_filter(self) -> Any:
        return None


def _capture(captured: dict[str, torch.Tensor], name: str):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            msg = f"layer {name!r} returns {type(output).__name__}, not a tensor; pick one of its sub-layers"
            raise SegExplainError(msg)
        captured[name] = output
    return hook


class LRP(_RuleMethod):
    """Layer-wise Relevance Propagation with a composite of rules.

    Relevance starts at the explained logits (``R = seed * logits``) and is redistributed layer by layer to the
    input voxels of every MRI sequence. ``delta`` reports conservation: ``sum(R_input) - sum(seed * logits)``.

    Args:
        composite: A registered name (``"epsilon_plus"``, ``"z_plus"``, ``"epsilon"``, ...; see
            :func:`SegExplainLib.engine.composites.composite_names`) or a :class:`Composite`. The default
            ``epsilon_plus`` keeps the input values in the first layer, so that per-sequence shares mean something
            (``epsilon_plus_flat`` and ``epsilon_plus_w_square`` ignore them: a warning says so).
        layer_filter: An :class:`~SegExplainLib.engine.filters.AmplitudeFilter` (or its spec, e.g. ``"pass:0.4"``)
            applied to the relevance entering every linear and norm layer during the propagation (Tjoa et al.'s
            layer-wise mode). The map is then no longer linear in the seed.
        **composite_options: Passed to the composite's factory, e.g. ``epsilon=1e-3``.

    Example:
        >>> lrp = LRP(composite="epsilon_plus")  # z+ in convolutions, the first one included
    """

    name = "lrp"

    def __init__(self, *, composite: str | Composite = "epsilon_plus", layer_filter: Any = None,
                 **composite_options: Any) -> None:
        self.composite = get_composite(composite, **composite_options)
        self.composite_options = dict(composite_options)
        self.layer_filter = AmplitudeFilter.parse(layer_filter) if isinstance(layer_filter, str) else layer_filter
        self.relevance_times_input = True

    @property
    def linear_in_seed(self) -> bool:  # type: ignore[override]
        return self.layer_filter is None

    def _layer_filter(self) -> Any:
        return self.layer_filter

    def options(self) -> dict[str, Any]:
        return {"composite": self.composite.name, **self.composite_options,
                "layer_filter": None if self.layer_filter is None else str(self.layer_filter)}

    def details(self) -> dict[str, Any]:
        return {"rules": {key: value for key, value in self.composite.options().items() if key != "composite"}}


class GuidedBackprop(_RuleMethod):
    """Guided Backprop: the gradient with only positive signals passed back through each rectifier.

    Correct for LeakyReLU and PReLU (their negative slope gates the forward part), where common libraries fall back
    to the plain gradient.
    """

    name = "guided_backprop"
    linear_in_seed = False

    def __init__(self) -> None:
        self.composite = GUIDED_BACKPROP
        self.relevance_times_input = False

    def options(self) -> dict[str, Any]:
        return {}


class Deconvolution(_RuleMethod):
    """Deconvolution: the backward signal passes through each rectifier's own function (ReLU, LeakyReLU, PReLU)."""

    name = "deconvolution"
    linear_in_seed = False

    def __init__(self) -> None:
        self.composite = DECONVOLUTION
        self.relevance_times_input = False

    def options(self) -> dict[str, Any]:
        return {}
