"""What a MONAI bundle's configuration may build without the user's word: names resolved by SegExplain, never by
MONAI's locator.

A bundle's configuration can run any Python (``$`` expressions, ``_target_`` of any importable name). Without
``trust_code``, the parts SegExplain builds or reads pass :func:`refuse_untrusted_config`: every ``_target_`` is
resolved here against an exact table of MONAI's network, transform and inferer classes and PyTorch's layer classes
(:func:`allowed_targets`) and MONAI is handed the class; the names MONAI would look up by itself (``act``, ``norm``,
``dropout``... in its layer factories, a loader's ``reader``) must be names of MONAI's own registries; ``$``
expressions must stay inside a small grammar. Loading transforms become a :class:`SkippedLoader`.
:func:`refuse_unknown_arguments` refuses arguments the installed MONAI's classes do not take. See
:mod:`~SegExplainLib.models.monai_bundle` for the pipeline.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SegExplainError
from .allowlist import OTHER_CODE_CLASSES, TRUST_ADVICE, AllowList

__all__ = ["LOADING_TRANSFORMS", "SkippedLoader", "allowed_targets", "refuse_unknown_arguments",
           "refuse_untrusted_config"]

#: Transforms that read files into memory: the case arrives in memory already, so they are never built.
#: Transforms that read files into memory: the case arrives in memory already, so they are never built.
LOADING_TRANSFORMS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")
#: Network arguments that MONAI looks up in one of its layer factories (monai.networks.layers.factories), by the
#: names MONAI 1.6's networks and blocks give them; a callable there would be called with the given arguments.
_FACTORY_ARGUMENTS = {
    **dict.fromkeys(("act", "act_name", "acti_type", "acti_type_1", "acti_type_2", "acti_type_final", "last_act",
                     "output_act"), "Act"),
    **dict.fromkeys(("norm", "norm_name", "norm_type"), "Norm"),
    "dropout": "Dropout", "pool": "Pool", "rel_pos_embedding": "RelPosEmbedding"}
#: Builtins a ``$`` expression may call (no attribute chains: see :func:`_expression_part`).
_EXPRESSION_BUILTINS = ("abs", "bool", "float", "int", "len", "list", "max", "min", "range", "round", "sum", "tuple")
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.And,
              ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot)
_GRAMMAR = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare,
            ast.IfExp, ast.Subscript, ast.Slice, ast.Load, ast.keyword, *_OPERATORS)
_REF = re.compile(r"@(?:\w*)(?:(?:::|#)\w*)*")


@functools.cache
def allowed_targets() -> AllowList:
    """What a ``_target_`` may name: MONAI's network, transform and inferer classes and PyTorch's layer classes, under
    their dotted names and, for MONAI's, under the bare names MONAI's configurations use (``"UNet"``)."""
    import monai.inferers
    import monai.networks.blocks
    import monai.networks.layers
    import monai.networks.nets
    import monai.transforms

    kinds = [(monai.transforms, monai.transforms.Transform), (monai.inferers, monai.inferers.Inferer),
             *((m, nn.Module) for m in (monai.networks.nets, monai.networks.blocks, monai.networks.layers))]
    names: dict[str, Any] = {}
    bare: dict[str, dict[int, Any]] = {}
    for module, base in [*kinds, (nn, nn.Module)]:
        def keep(obj: Any, base: type = base) -> bool:
            return inspect.isclass(obj) and issubclass(obj, base) and obj.__name__ not in OTHER_CODE_CLASSES

        dotted = AllowList.of_modules("", [module], keep=keep)
        names.update((name, dotted.get(name)) for name in dotted.names())
        for name in dotted.names() if module is not nn else ():  # MONAI's bare names are those of its modules
            if name.startswith(f"{module.__name__}."):
                bare.setdefault(name.rsplit(".", 1)[1], {})[id(dotted.get(name))] = dotted.get(name)
    # a bare name two modules give to different classes is ambiguous: it must be written in full
    names.update((name, *found.values()) for name, found in bare.items() if len(found) == 1)
    return AllowList("MONAI network, transform and inferer classes and PyTorch layer classes", names)


@functools.cache
def _expression_names() -> AllowList:
    """The names a ``$`` expression may use: a few builtins, and the dtypes of torch and numpy (``torch.float32``)."""
    import builtins

    names = {name: getattr(builtins, name) for name in _EXPRESSION_BUILTINS}
    names.update((f"torch.{name}", value) for name, value in vars(torch).items() if isinstance(value, torch.dtype))
    scalars = {name: value for name, value in vars(np).items()
               if not name.startswith("_") and inspect.isclass(value) and issubclass(value, np.generic)}
    names.update((f"{alias}.{name}", value) for alias in ("numpy", "np") for name, value in scalars.items())
    return AllowList("names SegExplain allows in expressions", names)


@functools.cache
def _readers() -> tuple[str, ...]:
    """The image reader names that MONAI's LoadImage looks up itself: its registry keys and reader class names."""
    from monai.transforms.io.array import SUPPORTED_READERS

    return tuple(sorted({*SUPPORTED_READERS, *(reader.__name__ for reader in SUPPORTED_READERS.values())}))


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a name or a chain of attributes of a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _expression_part(text: str) -> str | None:
    """The first part of the ``$`` expression ``text`` outside SegExplain's grammar, as source, or None.

    The grammar: literals, lists and tuples, arithmetic, comparisons, boolean and conditional operators, subscripts,
    ``@`` references, and names or calls of names that are, whole, one of :func:`_expression_names`
    (``torch.float32``, ``len(@labels)``). An attribute of anything else (``torch.hub``, ``@network.to``) is
    outside, as are lambdas, comprehensions and ``**``.
    """
    references: list[str] = []

    def named(match: re.Match) -> str:  # each reference becomes a plain name while the expression is checked
        references.append(match.group())
        return f"__ref{len(references) - 1}__"

    def shown(part: str) -> str:
        return re.sub(r"__ref(\d+)__", lambda m: references[int(m.group(1))], part)

    if "__ref" in text:  # would be taken for a reference below; no configuration needs such a name
        return text
    try:
        tree = ast.parse(_REF.sub(named, text[1:].strip()), mode="eval")
    except SyntaxError:
        return text
    allowed, placeholders = _expression_names(), {f"__ref{i}__" for i in range(len(references))}
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        dotted = _dotted(node)
        if dotted is not None:
            if dotted not in placeholders and allowed.get(dotted) is None:
                return shown(dotted)
            continue
        if isinstance(node, ast.Call):
            function = _dotted(node.func)
            if function is None or allowed.get(function) is None:
                return shown(ast.unparse(node.func))
            pending.extend([*node.args, *node.keywords])
            continue
        if not isinstance(node, _GRAMMAR) or isinstance(node, ast.keyword) and node.arg is None:
            return shown(ast.unparse(node))
        pending.extend(ast.iter_child_nodes(node))
    return None


def _factory_problem(value: Any, factory: Any) -> str | None:
    """Why ``value`` of a factory-resolved network argument is not one of ``factory``'s names, or None."""
    if value is None or isinstance(value, (bool, int, float)) or value == "":
        return None  # no layer, or a dropout rate
    name = value[0] if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], dict) else value
    if isinstance(name, str) and name.upper() in factory.components:
        return None
    return f"one of the names of MONAI's {factory.name.lower()} ({', '.join(sorted(factory.names)).lower()}), " \
           "alone or as [name, {arguments}]"


class SkippedLoader:
    """What stands for a loading transform of the bundle (``LoadImaged``...), which is never built: the case is in
    memory already. Calling it returns the data unchanged."""

    def __init__(self, transform: str) -> None:
        self.transform = transform

    def __call__(self, data: Any) -> Any:
        return data


def refuse_untrusted_config(parser: Any, roots: list[str], source: str, *, trusted: bool) -> list[str]:
    """Raise unless building the items ``roots`` of a bundle configuration runs only library code, or ``trusted``;
    hand MONAI the classes SegExplain resolved.

    Walks the items and every item they refer to (``@name``), after MONAI has resolved macros and relative ids:

    * every ``_target_`` must be, letter for letter, a name of :func:`allowed_targets`; SegExplain replaces it by the
      class itself, so that MONAI's locator never sees the string. Loading transforms (``LoadImaged``...) are
      replaced by a :class:`SkippedLoader`, never built (their ``reader`` must still be one of MONAI's reader names);
    * network arguments that MONAI looks up in its layer factories (``act``, ``norm``, ``dropout``...) must be
      literal names of the factory's registry, not expressions or references;
    * ``$`` expressions must stay inside the grammar of :func:`_expression_part`;
    * ``_mode_`` must be the default, and ``_debug_`` (MONAI's debugger) is refused.

    Args:
        parser: The ``monai.bundle.ConfigParser`` holding the configuration; changed in place.
        roots: Ids of the items to be built, e.g. ``["network_def", "preprocessing", "inferer::roi_size"]``.
        source: The configuration's name for the message, e.g. ``"MONAI bundle 'spleen' (configs/inference.json)"``.
        trusted: The user allows code of the bundle to run.

    Returns:
        Every ``key: what`` that could run code (empty when nothing; only when ``trusted``).

    Raises:
        SegExplainError: Some key could run code and ``trusted`` is false; the message names the key and the name.
    """
    from monai.networks.layers import factories

    targets, found, seen, pending = allowed_targets(), [], set(), list(roots)

    def refuse(key: str, what: str, expected: str) -> None:
        if not trusted:
            raise SegExplainError(f"{source}: {key} names {what}, which is not {expected}; building it could run "
                                  f"code of someone else; {TRUST_ADVICE}")
        found.append(f"{key}: {what}")

    while pending:
        root = pending.pop()
        if root in seen or root not in parser:
            continue
        seen.add(root)
        stack = [(root, parser[root])]
        while stack:
            key, value = stack.pop()
            if isinstance(value, dict):
                stack.extend((f"{key}::{k}", v) for k, v in value.items() if k not in ("_target_", "_mode_"))
                target = _resolve_target(value, key, targets, refuse) if "_target_" in value else None
                if inspect.isclass(target) and issubclass(target, nn.Module):
                    for name in sorted(_FACTORY_ARGUMENTS.keys() & value.keys()):
                        factory = getattr(factories, _FACTORY_ARGUMENTS[name])
                        expected = _factory_problem(value[name], factory)
                        if expected is not None:
                            refuse(f"{key}::{name}", repr(value[name]), expected)
                if value.get("_mode_", "default") != "default":
                    refuse(f"{key}::_mode_", repr(value["_mode_"]), "'default' (MONAI's other modes return "
                           "functions or start its debugger)")
                if value.get("_debug_", False):
                    refuse(f"{key}::_debug_", repr(value["_debug_"]), "false (MONAI's debugger)")
            elif isinstance(value, list):
                stack.extend((f"{key}::{i}", v) for i, v in enumerate(value))
            elif isinstance(value, str) and value.startswith(("$", "@")):
                pending.extend(ref[1:].replace("#", "::") for ref in _REF.findall(value) if len(ref) > 1)
                part = _expression_part(value) if value.startswith("$") else None
                if part is not None:
                    allowed = ", ".join(_EXPRESSION_BUILTINS)
                    refuse(key, f"{part!r} in the expression {value!r}",
                           f"a literal, an operator, an @reference or one of the names SegExplain allows in "
                           f"expressions ({allowed}, and dtypes such as torch.float32 or numpy.float32)")
    return found


def refuse_unknown_arguments(parser: Any, roots: list[str], source: str, monai_version: Any) -> None:
    """Raise when an item of ``roots`` gives its class an argument the class does not take, as MONAI's classes lose
    arguments between versions (SwinUNETR's ``img_size`` in 1.5); checked before anything is built.

    Args:
        parser: The ``monai.bundle.ConfigParser``, after :func:`refuse_untrusted_config` put the classes in place
            (names it left, the bundle's own code when trusted, are not checked).
        roots: Ids of the items to be built.
        source: The configuration's name for the message.
        monai_version: The MONAI version the bundle names (metadata.json's ``monai_version``), or None.
    """
    import monai
    from monai.bundle.config_item import ConfigComponent

    written = f"MONAI {monai_version}" if monai_version else "another MONAI version"
    stack = [(root, parser[root]) for root in roots if root in parser]
    while stack:
        key, value = stack.pop()
        if isinstance(value, list):
            stack.extend((f"{key}::{i}", v) for i, v in enumerate(value))
        if not isinstance(value, dict):
            continue
        stack.extend((f"{key}::{k}", v) for k, v in value.items() if k not in ConfigComponent.non_arg_keys)
        target = value.get("_target_")
        if not inspect.isclass(target) or target is SkippedLoader:
            continue
        parameters = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = [k for k in value if k not in ConfigComponent.non_arg_keys and k not in parameters]
        if unknown:
            raise SegExplainError(
                f"{source}: {key} gives {target.__name__} the argument {unknown[0]!r}, which {target.__name__} of the "
                f"installed MONAI {monai.__version__} does not take; the bundle needs {written} (its metadata's "
                "monai_version): open it where that version is installed")


def _resolve_target(item: dict[str, Any], key: str, targets: AllowList, refuse: Callable[..., None]) -> Any:
    """The class ``item``'s ``_target_`` names, put in its place (a stand-in for a loading transform), or None after
    ``refuse`` (which raises unless trusted)."""
    target = item["_target_"]
    if target is SkippedLoader or targets.allows(target):  # resolved already, through another reference
        return target
    found = targets.get(target)
    if found is None:
        refuse(f"{key}::_target_", repr(target), f"one of the {targets.what} SegExplain allows")
        return None
    if found.__name__ in LOADING_TRANSFORMS:
        reader = item.get("reader")
        if reader is not None and reader not in _readers():
            refuse(f"{key}::reader", repr(reader), f"one of MONAI's image readers ({', '.join(_readers())})")
        item.clear()
        item.update({"_target_": SkippedLoader, "transform": found.__name__})
        return SkippedLoader
    item["_target_"] = found
    return found
