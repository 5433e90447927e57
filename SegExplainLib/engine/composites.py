"""Composites: which rule for which layer, and the context that wires them into a model.

A :class:`Composite` maps layer *categories* (convolution, dense, norm, ...) to rules, optionally gives the first
layer (the one reading the image) its own rule and single named layers theirs. Presets are registered by name::

    register_composite("my_preset", lambda: Composite(rules={**lrp_defaults(), "convolution": Gamma(0.5)}))

While a composite is attached, every leaf module of the model must belong to a known category; a module or a
functional operation that the method cannot propagate through correctly raises :class:`UnsupportedLayerError`
naming it and its path, instead of silently degrading to the plain gradient. The forward pass runs to its end
first, so that the error names the most fundamental operation without a rule (attention before a gate, a gate
before a norm, a norm before a functional layer; see :func:`SegExplainLib.engine.functional.obstacle`) and the methods
that need no rules.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import SegExplainError, UnsupportedLayerError
from .canonizers import Canonizer, MergeBatchNorm
from .deployment import deployed
from .functional import (
    LRP_FUNCTIONS,
    MODIFIED_GRADIENT_FUNCTIONS,
    carries_relevance,
    function_name,
    obstacle,
    passes,
)
from .method import rule_free_methods
from .rules import (
    AlphaBeta,
    Deconvolution,
    Epsilon,
    Flat,
    Gamma,
    GuidedBackprop,
    Pass,
    Rule,
    WSquare,
    ZBox,
    Zero,
    ZPlus,
)
from .rules.base import CONVOLUTIONS, NORMS, TRANSPOSED_CONVOLUTIONS, PropagationContext

CATEGORIES: dict[str, tuple[type[nn.Module], ...]] = {
    "convolution": (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS),
    "dense": (nn.Linear,),
    "parameter_free": (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                       nn.AdaptiveAvgPool3d, nn.Upsample),
    "norm": NORMS,
    "rectifier": (nn.ReLU, nn.LeakyReLU, nn.PReLU),
    "activation": (nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Tanh, nn.Hardtanh,
                   nn.ReLU6, nn.Hardswish, nn.Softsign),
    "head": (nn.Softmax, nn.LogSoftmax, nn.Sigmoid),
    "passthrough": (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.ConstantPad1d,
                    nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
}

def category_of(module: nn.Module) -> str | None:
    """The category of a leaf module, or ``None`` if SegExplain does not know it.

    A subclass of a known layer counts as that layer only while it keeps the layer's own ``forward``: a convolution
    with weight standardization in its ``forward`` is another function than the convolution the rule would compute,
    so it is walked like any unknown module.
    """
    for category, types in CATEGORIES.items():
        if type(module) in types:
            return category
    for category, types in CATEGORIES.items():
        for base in types:
            if isinstance(module, base) and type(module).forward is base.forward:
                return category
    return None


@dataclass(frozen=True)
class Composite:
    """Which rule each layer of a network gets.

    Attributes:
        rules: Rule per category (see :data:`CATEGORIES`).
        first_layer: Rule for convolution/dense layers that read the network input (e.g. :class:`Flat`).
        layer_rules: Rule per module name from ``model.named_modules()``, overriding the category's rule.
        canonizers: Factories of canonizers applied while the composite is attached.
        required: Categories that must have a rule; a module of such a category without one is an error
            (an LRP composite cannot leave an ELU or an InstanceNorm to the plain gradient).
        passed_functions: Functional operations that the modified gradient passes exactly without a rule (see
            :mod:`SegExplainLib.engine.functional`); any other operation through which relevance flows outside a
            rule's module raises :class:`UnsupportedLayerError`.
        name: Registry name, for the record.
    """

    rules: Mapping[str, Rule]
    first_layer: Rule | None = None
    layer_rules: Mapping[str, Rule] = field(default_factory=dict)
    canonizers: tuple[Callable[[], Canonizer], ...] = (MergeBatchNorm,)
    required: frozenset[str] = frozenset({"convolution", "dense", "parameter_free", "norm", "activation"})
    passed_functions: frozenset = LRP_FUNCTIONS
    name: str = "custom"

    def __post_init__(self) -> None:
        for category, rule in self.rules.items():
            if category not in CATEGORIES:
                msg = f"unknown layer category {category!r}; expected one of {sorted(CATEGORIES)}"
                raise SegExplainError(msg)
            if category not in rule.categories:
                msg = f"rule {rule.name!r} cannot be used for {category!r} layers; it applies to {sorted(rule.categories)}"
                raise SegExplainError(msg)
        if self.first_layer is not None and not {"convolution", "dense"} & self.first_layer.categories:
            msg = f"first-layer rule {self.first_layer.name!r} must apply to convolution or dense layers"
            raise SegExplainError(msg)

    def rule_for(self, name: str, category: str, reads_input: bool) -> Rule | None:
        """The rule of module ``name`` of ``category``; ``reads_input`` tells whether it reads the network input."""
        if name in self.layer_rules:
            return self.layer_rules[name]
        if reads_input and self.first_layer is not None and category in ("convolution", "dense"):
            return self.first_layer
        rule = self.rules.get(category)
        if rule is not None and rule.first_layer_only and not reads_input:
            return None
        return rule

    def options(self) -> dict[str, Any]:
        """The composite as JSON-friendly values, for the explanation record."""
        return {
            "composite": self.name,
            "rules": {category: rule.options() for category, rule in self.rules.items()},
            "first_layer": None if self.first_layer is None else self.first_layer.options(),
            "layer_rules": {name: rule.options() for name, rule in self.layer_rules.items()},
            "canonizers": [factory().name for factory in self.canonizers],
        }

    @contextlib.contextmanager
    def attached(self, model: nn.Module, ctx: PropagationContext) -> Iterator[Callable[[torch.Tensor], Any]]:
        """Wire the rules into ``model`` and yield its guarded forward function.

        The model runs as deployed (:func:`SegExplainLib.engine.deployment.deployed`: norm statistics as the user runs
        them, dropout off, frozen parameters, in-place activations off); all of this, the canonizers and every hook
        are undone on exit, also after an exception.
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(deployed(model))
            for factory in self.canonizers:
                stack.enter_context(factory().applied(model))
            wiring = _Wiring(self, model, ctx)
            stack.callback(wiring.remove)
            yield wiring.forward


class _Wiring:
    """The hooks of one attached composite, and the forward that runs under the functional guard."""

    def __init__(self, composite: Composite, model: nn.Module, ctx: PropagationContext) -> None:
        self.composite, self.model, self.ctx = composite, model, ctx
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.stack: list[tuple[str, nn.Module]] = []
        self.head_outputs: list[tuple[str, nn.Module, torch.Tensor, int]] = []
        # operations without a rule met in the forward pass: (rank, order, short name, what, advice); the rank is
        # functional.obstacle's
        self.obstacles: list[tuple[int, int, str, str, str]] = []
        self.order = itertools.count()
        self.patched: list[tuple[nn.Module, Callable | None]] = []
        # leaves of a known category: their forward is the layer's own, and their rule (if any) handles it
        self.ruled: set[int] = set()
        try:
            for name, module in model.named_modules():
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._leave))
                category = None if next(module.children(), None) else category_of(module)
                if category is None:
                    continue  # containers and unknown leaves are walked: their functional operations are checked
                self._check_leaf(name, module, category)
                self.ruled.add(id(module))
                if category == "head":
                    self.handles.append(module.register_forward_hook(self._strip_head(name)))
                else:
                    self._patch_forward(name, module)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, instance_forward in self.patched:
            if instance_forward is None:
                del module.forward
            else:
                module.forward = instance_forward
        self.patched.clear()

    def _check_leaf(self, name: str, module: nn.Module, category: str) -> None:
        if category in self.composite.required and category not in self.composite.rules and (
                name not in self.composite.layer_rules):
            msg = (f"composite {self.composite.name!r} has no rule for {category} layer {type(module).__name__} "
                   f"at '{name}'")
            raise UnsupportedLayerError(msg)

    def _enter(self, name: str) -> Callable:
        def hook(module, args):
            self.stack.append((name, module))
        return hook

    def _leave(self, module, args, output):
        self.stack.pop()

    def _strip_head(self, name: str) -> Callable:
        """The softmax/sigmoid head is skipped: explanations are of the logits."""
        def hook(module, args, output):
            self.head_outputs.append((name, module, args[0], next(self.order)))
            return args[0]
        return hook

    def _patch_forward(self, name: str, module: nn.Module) -> None:
        """Route the module's calls through its rule; the instance attribute is removed again in :meth:`remove`."""
        category = category_of(module)
        original = module.forward
        self.patched.append((module, module.__dict__.get("forward")))

        def forward(*args, **kwargs):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                return original(*args, **kwargs)
            rule = self.composite.rule_for(name, category, self.ctx.reads_input(args[0]))
            return original(args[0]) if rule is None else rule.forward(module, args[0], original, self.ctx)

        module.forward = forward

    def refuse(self, func: Callable, args: tuple) -> None:
        """Note an operation through which relevance flows without a rule; :meth:`forward` raises for it."""
        where = f"'{self.stack[-1][0]}' ({type(self.stack[-1][1]).__name__})" if self.stack else "the model"
        rank, advice = obstacle(func, args)
        name = function_name(func)
        what = f"functional {name} in the forward of {where} bypasses the {self.composite.name!r} rules"
        self.obstacles.append((rank, next(self.order), f"{name} in {where}", what, advice))

    def forward(self, inputs: torch.Tensor) -> Any:
        try:
            with _FunctionalGuard(self):
                output = self.model(inputs)
        except Exception as error:
            if self.obstacles:  # a forward run on without the operations' own meaning may fail; they are the cause
                raise self._refusal() from error
            raise
        for name, module, logits, order in self.head_outputs:
            if output is not logits:
                # a softmax inside the network weighs values by scores (attention), a sigmoid gates them
                rank, advice = obstacle(torch.softmax if isinstance(module, nn.Softmax) else torch.sigmoid, ())
                where = f"{name!r} ({type(module).__name__})"
                self.obstacles.append((rank, order, where, f"{where} is a softmax/sigmoid inside the network, not its "
                                       "output head", advice))
        self.head_outputs.clear()
        if self.obstacles:
            raise self._refusal()
        if isinstance(output, torch.Tensor):
            _check_custom_functions(output, self.composite.name)
        return output

    def _refusal(self) -> UnsupportedLayerError:
        """The error naming the first operation of the most fundamental kind, then the first of each other kind."""
        obstacles = sorted(self.obstacles)
        first_rank, _, _, what, advice = obstacles[0]
        firsts: dict[int, str] = {}
        for rank, _, short, _, _ in obstacles:
            if rank != first_rank:
                firsts.setdefault(rank, short)
        others = f" (also without a rule: {'; '.join(firsts.values())})" if firsts else ""
        self.obstacles.clear()
        return UnsupportedLayerError(f"{what}; {advice}{others}; explain with {rule_free_methods()} instead, which "
                                     "need no rules")


class _FunctionalGuard(TorchFunctionMode):
    """Checks the functional operations called outside rule-handled leaves during the forward pass.

    Operations through which relevance flows must be ones the modified gradient passes exactly
    (:func:`SegExplainLib.engine.functional.passes`); operations on constants (weights of a blend, masks, shapes) do not
    touch the relevance and always run.
    """

    def __init__(self, wiring: _Wiring) -> None:
        super().__init__()
        self.wiring = wiring

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = self.wiring.stack
        if stack and id(stack[-1][1]) in self.wiring.ruled:
            return func(*args, **kwargs)
        result = _out_of_place(func, args, kwargs)(*args, **kwargs)
        if carries_relevance(result) and not passes(func, args, kwargs, self.wiring.composite.passed_functions):
            self.wiring.refuse(func, args)
        return result


_OWN_FUNCTIONS = ("_ReplaceBackward", "_TransformGrad")


def _check_custom_functions(output: torch.Tensor, composite: str) -> None:
    """Refuse custom autograd Functions in the explained graph: no hook sees them, and they bypass every rule."""
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            function = node._forward_cls.__name__  # type: ignore[attr-defined]
            if function not in _OWN_FUNCTIONS:
                msg = (f"the custom autograd Function {function} in the network bypasses the {composite!r} rules; "
                       f"explain with {rule_free_methods()} instead, which need no rules")
                raise UnsupportedLayerError(msg)
        todo.extend(parent for parent, _ in node.next_functions)


# Outputs of the rules keep their forward value for the backward pass, so in-place updates of them (``out += res``
# in a residual block, ``F.relu(h, inplace=True)``) are run out of place: the code rebinds the returned tensor.
_RULE_OUTPUTS = ("_ReplaceBackwardBackward", "_TransformGradBackward")


def _out_of_place(func: Callable, args: tuple, kwargs: dict) -> Callable:
    target = args[0] if args else None
    if not isinstance(target, torch.Tensor) or type(target.grad_fn).__name__ not in _RULE_OUTPUTS:
        return func
    if kwargs.get("inplace"):
        kwargs["inplace"] = False
        return func
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], func)
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch.Tensor, name[:-1], func)
    return func


# ---------------------------------------------------------------------------------------------------------------
# Registry of presets

_REGISTRY: dict[str, Callable[..., Composite]] = {}


def register_composite(name: str, factory: Callable[..., Composite]) -> None:
    """Register a composite factory under a snake_case name (overwrites an earlier one of the same name)."""
    if not name or not name.replace("_", "").isalnum() or name.lower() != name:
        msg = f"composite names are snake_case identifiers, got {name!r}"
        raise SegExplainError(msg)
    _REGISTRY[name] = factory


def composite_names() -> list[str]:
    """Names of all registered composites."""
    return sorted(_REGISTRY)


def get_composite(spec: str | Composite, **options: Any) -> Composite:
    """A registered composite by name (options go to its factory, e.g. ``epsilon=1e-3``), or a composite as is."""
    if isinstance(spec, Composite):
        return spec
    if spec not in _REGISTRY:
        msg = f"unknown composite {spec!r}; expected one of {composite_names()}"
        raise SegExplainError(msg)
    try:
        composite = _REGISTRY[spec](**options)
    except TypeError as error:
        msg = f"composite {spec!r} does not take options {sorted(options)}: {error}"
        raise SegExplainError(msg) from None
    return Composite(**{**composite.__dict__, "name": spec})


def lrp_defaults(epsilon: float = 1e-6, norm: Rule | None = None) -> dict[str, Rule]:
    """Rules every LRP composite shares: epsilon for everything linear, pass for activations and (by default) norms.

    ``Pass`` on a norm layer matches the z-plus family (it equals merging the norm into the convolution below). A
    composite that keeps epsilon on convolutions gives norms ``Epsilon`` too: after ``Pass`` the convolution's
    epsilon rule would divide by its own near-zero outputs.
    """
    return {"convolution": Epsilon(epsilon), "dense": Epsilon(epsilon), "parameter_free": Epsilon(epsilon),
            "norm": Pass() if norm is None else norm, "activation": Pass()}


def _conv_preset(conv_rule: Callable[[], Rule], first_layer: Callable[[], Rule] | None = None):
    def factory(epsilon: float = 1e-6, **first_layer_options: Any) -> Composite:
        if first_layer is None and first_layer_options:  # no first-layer rule to take them: never dropped silently
            raise TypeError(f"no first-layer rule takes {sorted(first_layer_options)}")
        first = None if first_layer is None else first_layer(**first_layer_options)
        return Composite(rules={**lrp_defaults(epsilon), "convolution": conv_rule()}, first_layer=first)
    return factory


def _uniform(rule: Callable[..., Rule]):
    def factory(**options: Any) -> Composite:
        return Composite(rules={**lrp_defaults(), "convolution": rule(**options), "dense": rule(**options)})
    return factory


register_composite("epsilon", lambda epsilon=1e-6: Composite(rules=lrp_defaults(epsilon, Epsilon(epsilon))))
register_composite("zero", lambda: Composite(rules={**lrp_defaults(0.0, Zero()), "convolution": Zero(),
                                                    "dense": Zero()}))
register_composite("z_plus", _uniform(ZPlus))
register_composite("alpha1_beta0", _uniform(lambda **o: AlphaBeta(1.0, 0.0, **o)))
register_composite("alpha2_beta1", _uniform(lambda **o: AlphaBeta(2.0, 1.0, **o)))
register_composite("gamma", _uniform(Gamma))
register_composite("epsilon_plus", _conv_preset(ZPlus))
register_composite("epsilon_plus_flat", _conv_preset(ZPlus, Flat))
register_composite("epsilon_plus_w_square", _conv_preset(ZPlus, WSquare))
register_composite("epsilon_plus_z_box", _conv_preset(ZPlus, ZBox))
register_composite("epsilon_alpha2_beta1", _conv_preset(lambda: AlphaBeta(2.0, 1.0)))
register_composite("epsilon_alpha2_beta1_flat", _conv_preset(lambda: AlphaBeta(2.0, 1.0), Flat))
register_composite("epsilon_gamma_z_box", _conv_preset(Gamma, ZBox))

_MODIFIED_BACKWARD = frozenset({"rectifier", "activation"})
GUIDED_BACKPROP = Composite(rules={"rectifier": GuidedBackprop(), "activation": GuidedBackprop()}, canonizers=(),
                            required=_MODIFIED_BACKWARD, passed_functions=MODIFIED_GRADIENT_FUNCTIONS,
                            name="guided_backprop")
DECONVOLUTION = Composite(rules={"rectifier": Deconvolution()}, canonizers=(), required=_MODIFIED_BACKWARD,
                          passed_functions=MODIFIED_GRADIENT_FUNCTIONS, name="deconvolution")
