"""MONAI bundles as pipelines: the bundle's network, preprocessing and sliding window, explained on the images.

A MONAI bundle is a folder::

    configs/inference.json (or .yaml)   network_def, preprocessing, inferer
    configs/metadata.json               name, version, channel names (network_data_format)
    models/model.pt                     the state dict of network_def, or
    models/model.ts                     the network as TorchScript

:func:`open_bundle` builds ``network_def`` and ``preprocessing`` with ``monai.bundle.ConfigParser`` and reads the
options of ``inferer``: a ``SlidingWindowInferer`` becomes a :class:`~SegExplainLib.models.sliding.SlidingWindow` that runs
MONAI's ``sliding_window_inference`` as the bundle configures it (axes shorter than ``roi_size`` padded with
``padding_mode`` and ``cval``, MONAI's window positions for ``overlap``, ``sw_batch_size`` windows per call, MONAI's
importance map for ``mode`` and ``sigma_scale``), so the explained logits are the inferer's on every scan size; the
maps come back cropped to the scan, and the record says what was padded (``window_padding``).
:meth:`BundlePipeline.prepare` runs the preprocessing on the case as read (``LoadImage(d)`` and
``EnsureChannelFirst(d)`` are never built: the case is already in memory) and follows every transform that moves
voxels, from the change of the image's affine and shape it makes. Such a transform must be one whose effect
SegExplain can transpose exactly, and it is checked by reproducing its output from its input:

* a permutation, flip, crop or zero pad of the voxel grid (``Orientationd``, ``Flipd``, ``SpatialCropd``,
  ``CenterSpatialCropd``, ``CropForegroundd``, ``SpatialPadd``, ``DivisiblePadd``...): values move unchanged;
* linear resampling (``Spacingd`` with ``mode="bilinear"``, the default): each network voxel's relevance goes back
  to the voxels it was interpolated from, in proportion to the interpolation weights (the transpose of the
  interpolation, so the total is kept exactly).

Anything else (nearest or spline resampling, ``Resized`` in area mode, edge padding, random transforms) is an
error naming the transform. A class given an argument it does not take (a bundle written for another MONAI version:
SwinUNETR lost ``img_size`` in MONAI 1.5) is refused before anything is built, naming the argument and the version
in the bundle's metadata. Relevance comes back as sums (see :mod:`SegExplainLib.models.pipelines`); relevance on padded
voxels, which hold no image voxel, is dropped.

Safety: a bundle's configuration can run any Python (``$`` expressions, ``_target_`` of any importable name), and
so can TorchScript. Without ``trust_code``, a bundle with only ``models/model.ts`` is refused, and the parts
SegExplain builds or reads (``network_def``, ``preprocessing``, the inferer's options that change its result, and
everything they refer to) pass :func:`refuse_untrusted_config`: SegExplain resolves
every ``_target_`` itself against an exact table of MONAI's network, transform and inferer classes and PyTorch's
layer classes and hands MONAI the class; the names MONAI would look up by itself (``act``, ``norm``, ``dropout``...
in its layer factories, a loader's ``reader``) must be names of MONAI's own registries; ``$`` expressions must stay
inside a small grammar. ``LoadImage(d)`` and ``EnsureChannelFirst(d)`` are never built. Other keys (``datalist``,
``evaluator``, ``run``...) are never evaluated, and ``device`` is set to ``"cpu"``: SegExplain places the network
itself.

Example:
    >>> pipeline = open_bundle("spleen_ct_segmentation")
    >>> result = explain_case(pipeline, image, geometry, PredictedRegion(class_index=1), "integrated_gradients")
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.api import METHODS
from ..engine.method import rule_free_methods
from .allowlist import OTHER_CODE_CLASSES, TRUST_ADVICE, AllowList
from ..errors import SegExplainError
from .loading import load_weights
from .protocol import Pipeline, PreparedCase
from .sliding import PAD_MODES, SlidingWindow

__all__ = ["BundlePipeline", "open_bundle", "read_sequence_names"]

#: Transforms that read files into memory: the case arrives in memory already, so they are never built.
_LOADING = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")
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
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
#: The options of a SlidingWindowInferer that change its result, which SegExplain's sliding window follows (the
#: others place it on devices or buffer it).
_WINDOW_OPTIONS = ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval", "with_coord")
_REF = re.compile(r"@(?:\w*)(?:(?:::|#)\w*)*")


@functools.cache
def _targets() -> AllowList:
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


class _Loaded:
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

    * every ``_target_`` must be, letter for letter, a name of :func:`_targets`; SegExplain replaces it by the class
      itself, so that MONAI's locator never sees the string. Loading transforms (``LoadImaged``...) are replaced by
      a stand-in that is never built (their ``reader`` must still be one of MONAI's reader names);
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

    targets, found, seen, pending = _targets(), [], set(), list(roots)

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
        if not inspect.isclass(target) or target is _Loaded:
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
    if target is _Loaded or targets.allows(target):  # resolved already, through another reference
        return target
    found = targets.get(target)
    if found is None:
        refuse(f"{key}::_target_", repr(target), f"one of the {targets.what} SegExplain allows")
        return None
    if found.__name__ in _LOADING:
        reader = item.get("reader")
        if reader is not None and reader not in _readers():
            refuse(f"{key}::reader", repr(reader), f"one of MONAI's image readers ({', '.join(_readers())})")
        item.clear()
        item.update({"_target_": _Loaded, "transform": found.__name__})
        return _Loaded
    item["_target_"] = found
    return found


@dataclass(frozen=True)
class _Step:
    """A preprocessing transform that moved voxels: output voxel index ``o`` reads input index ``matrix @ o``."""

    transform: str
    matrix: np.ndarray
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @functools.cached_property
    def exact(self) -> bool:
        """A signed permutation with whole-voxel offsets (reorientation, flip, crop, pad): values move unchanged."""
        linear, offset = self.matrix[:3, :3], self.matrix[:3, 3]
        signs = np.rint(linear)
        return bool(np.allclose(linear, signs, atol=1e-6) and (np.abs(signs).sum(0) == 1).all()
                    and (np.abs(signs).sum(1) == 1).all() and np.allclose(offset, np.rint(offset), atol=1e-4))

    @functools.cached_property
    def _index(self) -> tuple[list[int], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Input axis per output axis, and per axis the output and input indices that meet inside both grids."""
        signs, offset = np.rint(self.matrix[:3, :3]).astype(int), np.rint(self.matrix[:3, 3]).astype(int)
        axes, outputs, inputs = [], [], []
        for a, size in enumerate(self.out_shape):
            j = int(np.flatnonzero(signs[:, a])[0])
            read = signs[j, a] * np.arange(size) + offset[j]
            inside = (read >= 0) & (read < self.in_shape[j])
            axes.append(j)
            outputs.append(torch.as_tensor(np.flatnonzero(inside)))
            inputs.append(torch.as_tensor(read[inside]))
        return axes, tuple(outputs), tuple(inputs)

    @functools.cached_property
    def _grid(self) -> torch.Tensor:
        """Where each output voxel samples the input, in ``grid_sample``'s coordinates (align_corners=True)."""
        indices = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in self.out_shape), indexing="ij")
        matrix = torch.as_tensor(self.matrix, dtype=torch.float64)
        source = torch.stack(indices, -1) @ matrix[:3, :3].T + matrix[:3, 3]
        scale = torch.tensor([2 / (n - 1) if n > 1 else 0.0 for n in self.in_shape], dtype=torch.float64)
        return (source * scale - 1).flip(-1)[None]  # grid_sample wants (x, y, z) = the last axis first

    @staticmethod
    def _mesh(indices: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return indices[0][:, None, None], indices[1][None, :, None], indices[2][None, None, :]

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """``field`` (C, *in_shape) as the transform moves it: (C, *out_shape); zeros where nothing is read."""
        if not self.exact:
            return nn.functional.grid_sample(field[None], self._grid.to(field.dtype), mode="bilinear",
                                             padding_mode="border", align_corners=True)[0]
        axes, outputs, inputs = self._index
        moved = field.permute(0, *(1 + j for j in axes))
        result = field.new_zeros((field.shape[0], *self.out_shape))
        result[(slice(None), *self._mesh(outputs))] = moved[(slice(None), *self._mesh(inputs))]
        return result

    def transpose(self, maps: torch.Tensor) -> torch.Tensor:
        """Relevance (C, *out_shape) back onto the input grid (C, *in_shape): the transpose of :meth:`forward`."""
        if not self.exact:
            source = maps.new_zeros((maps.shape[0], *self.in_shape), requires_grad=True)
            (back,) = torch.autograd.grad(self.forward(source), source, maps)
            return back
        axes, outputs, inputs = self._index
        moved = maps.new_zeros((maps.shape[0], *(self.in_shape[j] for j in axes)))
        moved[(slice(None), *self._mesh(inputs))] = maps[(slice(None), *self._mesh(outputs))]
        return moved.permute(0, *(1 + int(a) for a in np.argsort(axes)))

    def describe(self) -> dict[str, Any]:
        return {"transform": self.transform, "kind": "moved" if self.exact else "resampled (bilinear)",
                "from_shape": list(self.in_shape), "to_shape": list(self.out_shape)}


def _affine_ras(geometry: Any) -> np.ndarray:
    """The RAS affine of the (x, y, z)-ordered array of ``geometry`` (ITK, LPS), as MONAI's image readers make it."""
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(geometry.direction, (3, 3)) * np.asarray(geometry.spacing)[None, :]
    affine[:3, 3] = geometry.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _step(name: str, before: Any, after: Any) -> _Step | None:
    """The voxel move that transform ``name`` made from ``before`` to ``after``, checked; None when it moved none."""
    matrix = np.linalg.solve(before.affine.numpy().astype(np.float64), after.affine.numpy().astype(np.float64))
    in_shape, out_shape = tuple(before.shape[1:]), tuple(after.shape[1:])
    if in_shape == out_shape and np.allclose(matrix, np.eye(4), atol=1e-6):
        return None
    if len(out_shape) != 3:
        raise SegExplainError(f"the bundle's {name} made an image of shape {tuple(after.shape)}; expected (C, x, y, z)")
    step = _Step(name, matrix, in_shape, out_shape)
    source = before.as_tensor().detach().to(torch.float64)
    difference = float((step.forward(source) - after.as_tensor().detach().to(torch.float64)).abs().max())
    scale = max(float(source.abs().max()), 1e-12)
    if difference > 1e-3 * scale:
        raise SegExplainError(
            f"the bundle's {name} moves voxels in a way SegExplain cannot bring relevance back through exactly "
            f"(it differs from a permutation, crop, zero pad or bilinear resampling by {difference / scale:.2g} of "
            "the image's range); supported: Orientationd, Flipd, crops, zero pads and Spacingd with mode='bilinear'")
    return step


def _inferer(parser: Any, source: str) -> tuple[type | None, list[str]]:
    """The class of the bundle's inferer (None without one) and the ids of the options SegExplain reads from it.

    The inferer is never built: SegExplain runs its own sliding window with the bundle's options, so the inferer's
    device and buffering arguments need no trust.
    """
    from monai.inferers import SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt

    if "inferer" not in parser:
        return None, []
    raw = parser["inferer"]
    found = _targets().get(raw.get("_target_")) if isinstance(raw, dict) else None
    if found not in (SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt):  # not SliceInferer's 2D slices
        target = raw.get("_target_") if isinstance(raw, dict) else raw
        raise SegExplainError(f"{source}: the inferer {target!r} is not supported; expected monai.inferers' "
                              "SimpleInferer, SlidingWindowInferer or SlidingWindowInfererAdapt")
    if found is SimpleInferer:
        return found, []
    if "roi_size" not in raw:
        raise SegExplainError(f"{source}: the {found.__name__} has no roi_size; expected the patch size")
    return found, [f"inferer::{k}" for k in _WINDOW_OPTIONS if k in raw]


def _window_starts(grid: tuple[int, ...], patch: tuple[int, ...], *, overlap: tuple[float, ...]) -> list[list[int]]:
    """The window starts of MONAI's ``sliding_window_inference`` per axis of the (padded) ``grid``: its scan interval
    (the whole patch where it spans the axis, else ``int(patch * (1 - overlap))``, at least 1) through MONAI's own
    ``dense_patch_slices``."""
    from monai.data.utils import dense_patch_slices

    interval = [p if p == g else max(int(p * (1 - o)), 1) for g, p, o in zip(grid, patch, overlap)]
    windows = dense_patch_slices(grid, patch, interval)
    return [sorted({int(window[axis].start) for window in windows}) for axis in range(len(grid))]


def _sliding_window(inferer: dict[str, Any] | None, network: nn.Module,
                    spatial: tuple[int, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """The network as the bundle's inferer runs it on a volume of ``spatial`` size, and a record of how.

    MONAI's ``sliding_window_inference``: axes shorter than ``roi_size`` padded (``padding_mode``, ``cval``, half the
    difference rounded down before), windows placed as :func:`_window_starts`, ``sw_batch_size`` of them per call,
    blended with MONAI's ``compute_importance_map`` (``mode`` constant or gaussian, ``sigma_scale``), the output
    cropped back to ``spatial``.
    """
    from monai.data.utils import compute_importance_map

    if inferer is None or "roi_size" not in inferer:
        return network, {"inferer": None if inferer is None else inferer["class"]}
    name = inferer["class"]

    def per_axis(option: str) -> tuple[float, ...]:
        values = np.atleast_1d(np.asarray(inferer[option], dtype=float))
        if values.size not in (1, len(spatial)):
            raise SegExplainError(f"the bundle's {name} has {option}={inferer[option]!r}; expected one value or one "
                                  f"per axis ({len(spatial)})")
        return tuple(float(v) for v in np.broadcast_to(values, (len(spatial),)))

    roi = np.broadcast_to(np.asarray(inferer["roi_size"]), (len(spatial),))
    patch = tuple(int(r) if r > 0 else s for r, s in zip(roi, spatial))  # MONAI: non-positive means the whole axis
    overlap, sigma_scale = per_axis("overlap"), per_axis("sigma_scale")
    if not all(0 <= o < 1 for o in overlap):
        raise SegExplainError(f"the bundle's {name} has overlap={inferer['overlap']!r}; expected values in [0, 1)")
    mode, padding_mode, batch = inferer["mode"], inferer["padding_mode"], inferer["sw_batch_size"]
    if mode not in ("constant", "gaussian"):
        raise SegExplainError(f"the bundle's {name} has mode={mode!r}; expected 'constant' or 'gaussian'")
    if padding_mode not in PAD_MODES:
        raise SegExplainError(f"the bundle's {name} has padding_mode={padding_mode!r}; expected one of "
                              f"{', '.join(PAD_MODES)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise SegExplainError(f"the bundle's {name} has sw_batch_size={batch!r}; expected a positive integer")
    if inferer["with_coord"]:
        raise SegExplainError(f"the bundle's {name} has with_coord=True: it calls the network with each window's "
                              "coordinates, which SegExplain's sliding window does not pass")
    weight = compute_importance_map(patch, mode=mode, sigma_scale=sigma_scale, dtype=torch.float32)
    window = SlidingWindow(network, patch, positions=functools.partial(_window_starts, overlap=overlap),
                           weight=weight, pad_to_patch=True, pad_mode=padding_mode, pad_value=float(inferer["cval"]),
                           batch_size=batch)
    before = [(p - s) // 2 if s < p else 0 for p, s in zip(patch, spatial)]
    after = [max(p - s, 0) - b for p, s, b in zip(patch, spatial, before)]
    padded = {"before": before, "after": after, "mode": padding_mode,
              **({"value": float(inferer["cval"])} if padding_mode == "constant" else {})}
    return window, {"inferer": name, "patch_size": list(patch), "sw_batch_size": batch, "overlap": list(overlap),
                    "blending": mode, **({"sigma_scale": list(sigma_scale)} if mode == "gaussian" else {}),
                    "window_padding": padded if any(before) or any(after) else None}


class BundlePipeline(Pipeline):
    """A MONAI bundle opened by :func:`open_bundle` (see the module docs).

    Attributes:
        folder: The bundle folder.
        network: The network (eval mode); TorchScript when the bundle has only ``models/model.ts``.
        scripted: Whether ``network`` is TorchScript (then only methods that do not walk modules work).
        transforms: The preprocessing transforms in order; file loading as stand-ins that are skipped.
        inferer: The bundle's inferer as its class name and the options SegExplain follows, or None.
    """

    kind = "bundle"

    def __init__(self, folder: Path, *, network: nn.Module, weights: Path, transforms: list[Any],
                 inferer: dict[str, Any] | None,
                 image_key: str, sequences: list[str], classes: list[str], metadata: dict[str, Any],
                 config_file: Path, trusted_code: list[str]) -> None:
        self.folder, self.network, self.weights, self.transforms = folder, network, weights, transforms
        self.inferer, self.image_key, self.metadata, self.config_file = inferer, image_key, metadata, config_file
        self.sequences, self.classes, self.trusted_code = sequences, classes, trusted_code
        self.scripted = isinstance(network, torch.jit.ScriptModule)

    def check_method(self, method: Any) -> None:
        """Refuse methods that attach rules to Python modules (LRP...) when the bundle's network is TorchScript."""
        walks = METHODS[method].walks_modules if method in METHODS else getattr(method, "walks_modules", False)
        if self.scripted and walks:
            name = method if isinstance(method, str) else method.name
            raise SegExplainError(
                f"MONAI bundle {str(self.folder)!r} has its network only as TorchScript ({self.weights.name}), "
                f"which method {name!r} cannot attach its rules to; use {rule_free_methods()}, or add models/model.pt "
                "(the state dict) so that network_def is built from its Python class")

    def prepare(self, image: np.ndarray, geometry: Any) -> PreparedCase:
        """Run the bundle's preprocessing on ``image`` (C, D, H, W) on ``geometry`` (ITK conventions, LPS)."""
        from monai.data import MetaTensor
        from monai.transforms import MapTransform, Randomizable

        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4 or tuple(image.shape[1:]) != tuple(geometry.shape):
            raise SegExplainError(f"image has shape {image.shape}; expected (C, D, H, W) on the geometry's grid "
                                  f"(D, H, W) = {tuple(geometry.shape)}")
        affine = torch.as_tensor(_affine_ras(geometry))
        array = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 2, 1)))  # MONAI's (C, x, y, z)
        meta = {"original_affine": affine.clone(), "spatial_shape": np.asarray(array.shape[1:]),
                "original_channel_dim": 0, "space": "RAS", "filename_or_obj": "case"}
        current = MetaTensor(array, affine=affine, meta=meta)
        steps, applied, skipped = [], [], []
        for transform in self.transforms:
            if isinstance(transform, _Loaded):
                skipped.append(transform.transform)
                continue
            name = type(transform).__name__
            if isinstance(transform, Randomizable):
                raise SegExplainError(f"the bundle's preprocessing has the random transform {name}; an explanation "
                                      "needs the same input every time")
            keyed = isinstance(transform, MapTransform)
            try:
                with torch.no_grad():
                    output = transform({self.image_key: current} if keyed else current)
            except Exception as error:  # noqa: BLE001 - any failure of the bundle's code means the same to the user
                raise SegExplainError(f"the bundle's preprocessing step {name} failed on the case: "
                                      f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                                      ) from error
            output = output[self.image_key] if keyed else output
            if not isinstance(output, MetaTensor):
                raise SegExplainError(f"the bundle's preprocessing step {name} returned a {type(output).__name__} "
                                      "without the image's geometry; expected a MetaTensor")
            step = _step(name, current, output)
            if step is not None:
                steps.append(step)
            applied.append(name)
            current = output
        network_input = current.as_tensor().detach().to(torch.float32).cpu().numpy()
        model, window = _sliding_window(self.inferer, self.network, tuple(network_input.shape[1:]))
        original = tuple(image.shape[1:])

        def maps_to_original(maps: np.ndarray) -> np.ndarray:
            maps = np.asarray(maps)
            values = torch.as_tensor(maps, dtype=torch.float64)
            for step in reversed(steps):
                values = step.transpose(values)
            return values.numpy().transpose(0, 3, 2, 1).astype(maps.dtype, copy=False)

        def region_to_network(region: np.ndarray) -> np.ndarray:
            region = np.asarray(region, bool)
            if region.shape != original:
                raise SegExplainError(f"region has shape {region.shape}; expected the image grid {original}")
            share = torch.as_tensor(np.ascontiguousarray(region.T), dtype=torch.float64)[None]
            for step in steps:
                share = step.forward(share)
            share = share[0].numpy()
            mapped = share >= 0.5
            if not mapped.any() and share.max() > 0:  # a click smaller than a network voxel keeps its best voxel
                mapped = share >= share.max() * (1 - 1e-9)
            return mapped

        record = {"network_shape": list(network_input.shape[1:]), "network_affine": current.affine.tolist(),
                  "preprocessing": applied, "skipped": skipped, "spatial_steps": [s.describe() for s in steps],
                  **window}
        return PreparedCase(model=model, input=network_input, region_to_network=region_to_network,
                            maps_to_original=maps_to_original, record=record)

    def describe(self) -> dict[str, Any]:
        """The bundle: folder, name and version from its metadata, weights file, network and inferer."""
        return {"kind": self.kind, "folder": str(self.folder), "config": self.config_file.name,
                "name": self.metadata.get("name", self.folder.name), "version": self.metadata.get("version"),
                "weights": str(self.weights.relative_to(self.folder)),
                "network": "TorchScript" if self.scripted else type(self.network).__name__,
                "inferer": self.inferer, "sequences": self.sequences, "classes": self.classes,
                "trusted_code": self.trusted_code}


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of an inferer option (tuples, arrays and MONAI's string enums)."""
    return str(value) if isinstance(value, str) else np.asarray(value).tolist()


def _data_format(metadata: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """From metadata.json's ``network_data_format``: the image input's key, its entry and the first output's."""
    data_format = metadata.get("network_data_format", {})
    inputs, outputs = data_format.get("inputs", {}) or {}, data_format.get("outputs", {}) or {}
    image_key = next(iter(inputs), "image")
    return image_key, inputs.get(image_key, {}), next(iter(outputs.values()), {})


def _channel_names(section: dict[str, Any], count: int | None, prefix: str) -> list[str]:
    """Channel names from a metadata ``network_data_format`` entry, else ``prefix0..`` for ``count`` channels."""
    definition = section.get("channel_def")
    if isinstance(definition, dict) and definition:
        return [str(definition[k]) for k in sorted(definition, key=lambda k: int(k) if str(k).isdigit() else 0)]
    count = section.get("num_channels", count)
    return [f"{prefix}{i}" for i in range(int(count))] if isinstance(count, int) else []


def read_sequence_names(path: Any) -> list[str]:
    """The input channels' names that a bundle's ``configs/metadata.json`` gives (``channel_def`` or
    ``num_channels`` of the image input), without building the network; empty when it gives none."""
    metadata_file = Path(path).expanduser().resolve() / "configs" / "metadata.json"
    try:
        _, image, _ = _data_format(json.loads(metadata_file.read_text()))
        return _channel_names(image, None, "channel")
    except (OSError, ValueError, AttributeError, TypeError):
        return []


@contextlib.contextmanager
def _importable(folder: Path, allowed: bool) -> Iterator[None]:
    """With trusted code, the bundle's own ``scripts`` package is importable while the configuration is built."""
    if not allowed:
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def open_bundle(path: Any, *, trust_code: bool = False) -> BundlePipeline:
    """Open a MONAI bundle folder as a pipeline (see the module docs).

    Args:
        path: The bundle folder, holding ``configs/inference.json`` (or ``.yaml``) and ``models/model.pt`` (or only
            ``models/model.ts``).
        trust_code: Allow the configuration to run code beyond building MONAI and PyTorch classes (the command
            line's ``--trust-model-code``).

    Raises:
        SegExplainError: The folder lacks a configuration or weights, the configuration would run code and
            ``trust_code`` is false, or building the network, the preprocessing or the weights failed.
    """
    if not isinstance(trust_code, bool):
        raise SegExplainError(f"trust_code must be True or False, got {trust_code!r}")
    folder = Path(path).expanduser().resolve()
    expected = "a MONAI bundle folder with configs/inference.json (or .yaml) and models/model.pt or models/model.ts"
    if not folder.is_dir():
        raise SegExplainError(f"MONAI bundle {str(folder)!r} is not a folder; expected {expected}")
    config_file = next((folder / "configs" / n for n in _CONFIG_NAMES if (folder / "configs" / n).is_file()), None)
    if config_file is None:
        raise SegExplainError(f"MONAI bundle {str(folder)!r} has no configs/inference.json (nor .yaml); "
                              f"expected {expected}")
    weights = next((folder / "models" / n for n in ("model.pt", "model.ts") if (folder / "models" / n).is_file()),
                   None)
    if weights is None:
        raise SegExplainError(f"MONAI bundle {str(folder)!r} has no weights: expected models/model.pt (the state "
                              "dict of network_def) or models/model.ts (TorchScript)")
    from monai.bundle import ConfigParser

    source = f"MONAI bundle {str(folder)!r} ({config_file.relative_to(folder)})"
    parser = ConfigParser()
    try:
        parser.read_config(config_file)
        metadata_file = folder / "configs" / "metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
        parser["bundle_root"] = str(folder)
        if "device" in parser:
            parser["device"] = "cpu"
        parser.resolve_macro_and_relative_ids()
    except Exception as error:  # noqa: BLE001 - a malformed file, whatever the parser says about it
        raise SegExplainError(f"{source} cannot be read: {type(error).__name__}: {error}") from error
    scripted = weights.suffix == ".ts"
    if scripted and not trust_code:
        raise SegExplainError(f"MONAI bundle {str(folder)!r} has its network only as TorchScript "
                              f"({weights.relative_to(folder)}): TorchScript is code, which runs when it is loaded "
                              f"and when it is run; add models/model.pt (the state dict of network_def), or "
                              f"{TRUST_ADVICE}")
    inferer_class, inferer_options = _inferer(parser, source)
    built = [*([] if scripted else ["network_def"]), "preprocessing"]
    roots = [*built, *inferer_options]
    if not scripted and "network_def" not in parser:
        raise SegExplainError(f"{source} has no network_def; expected the network's _target_ and its arguments")
    trusted_code = [*refuse_untrusted_config(parser, roots, source, trusted=trust_code),
                    *([f"{weights.relative_to(folder)}: TorchScript"] if scripted else [])]
    refuse_unknown_arguments(parser, built, source, metadata.get("monai_version"))

    def build(key: str) -> Any:
        if key not in parser:
            return None
        try:
            with _importable(folder, trust_code):
                return parser.get_parsed_content(key)
        except Exception as error:  # noqa: BLE001 - the bundle's own code may raise anything
            cause = error.__cause__ or error
            raise SegExplainError(f"{source}: building {key} failed: {type(cause).__name__}: {cause}") from error

    if trust_code and "imports" in parser:
        build("imports")
    if scripted:
        try:
            network = torch.jit.load(str(weights), map_location="cpu")
        except Exception as error:  # noqa: BLE001
            raise SegExplainError(f"{source}: {weights} is not a TorchScript file: {error}") from error
    else:
        network = build("network_def")
        if not isinstance(network, nn.Module):
            raise SegExplainError(f"{source}: network_def built a {type(network).__name__}; expected a torch.nn.Module")
        load_weights(network, weights)
    network.eval()  # as MONAI's evaluators run it
    preprocessing = build("preprocessing")
    if preprocessing is None:
        transforms = []
    elif hasattr(preprocessing, "flatten"):
        transforms = list(preprocessing.flatten().transforms)
    else:
        transforms = list(preprocessing) if isinstance(preprocessing, (list, tuple)) else [preprocessing]
    image_key, image, output = _data_format(metadata)
    network_config = parser["network_def"] if "network_def" in parser else {}
    network_config = network_config if isinstance(network_config, dict) else {}
    sequences = _channel_names(image, network_config.get("in_channels"), "channel")
    classes = _channel_names(output, network_config.get("out_channels"), "class")
    if not sequences:
        raise SegExplainError(f"{source}: the number of input channels is unknown; expected network_data_format."
                              f"inputs.{image_key}.num_channels (or channel_def) in configs/metadata.json")
    inferer = None
    if inferer_class is not None:
        defaults = inspect.signature(inferer_class).parameters
        inferer = {"class": inferer_class.__name__, **{
            k: _plain(build(f"inferer::{k}") if f"inferer::{k}" in inferer_options else defaults[k].default)
            for k in _WINDOW_OPTIONS if k in defaults}}
    return BundlePipeline(folder, network=network, weights=weights, transforms=transforms, inferer=inferer,
                          image_key=image_key, sequences=sequences, classes=classes, metadata=metadata,
                          config_file=config_file, trusted_code=trusted_code)
