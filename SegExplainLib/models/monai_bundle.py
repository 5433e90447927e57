"""MONAI bundles as pipelines: the bundle's network, preprocessing and sliding window, explained on the images.

A MONAI bundle is a folder::

    configs/inference.json (or .yaml)   network_def, preprocessing, inferer
    configs/metadata.json               name, version, channel names (network_data_format)
    models/model.pt                     the state dict of network_def, or
    models/model.ts                     the network as TorchScript

:func:`open_bundle` builds ``network_def`` and ``preprocessing`` with ``monai.bundle.ConfigParser`` and reads the
options of ``inferer``: a ``SlidingWindowInferer`` becomes a :class:`~SegExplainLib.models.sliding.SlidingWindow`
that runs MONAI's ``sliding_window_inference`` as the bundle configures it (axes shorter than ``roi_size`` padded
with ``padding_mode`` and ``cval``, MONAI's window positions for ``overlap``, ``sw_batch_size`` windows per call,
MONAI's importance map for ``mode`` and ``sigma_scale``), so the explained logits are the inferer's on every scan
size; the maps come back cropped to the scan, and the record says what was padded (``window_padding``).
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
in the bundle's metadata. Relevance comes back as sums (see :mod:`SegExplainLib.models.protocol`); relevance on
padded voxels, which hold no image voxel, is dropped. The moves are followed in
:mod:`~SegExplainLib.models.bundle_transforms`, the inferer in :mod:`~SegExplainLib.models.bundle_inferer`.

Safety: a bundle's configuration can run any Python (``$`` expressions, ``_target_`` of any importable name), and so
can TorchScript. Without ``trust_code``, a bundle with only ``models/model.ts`` is refused, and the parts SegExplain
builds or reads (``network_def``, ``preprocessing``, the inferer's options that change its result, and everything
they refer to) pass :func:`~SegExplainLib.models.bundle_safety.refuse_untrusted_config`: SegExplain resolves every
``_target_`` itself against an exact table of MONAI's network, transform and inferer classes and PyTorch's layer
classes and hands MONAI the class; the names MONAI would look up by itself (``act``, ``norm``, ``dropout``... in its
layer factories, a loader's ``reader``) must be names of MONAI's own registries; ``$`` expressions must stay inside
a small grammar. ``LoadImage(d)`` and ``EnsureChannelFirst(d)`` are never built. Other keys (``datalist``,
``evaluator``, ``run``...) are never evaluated, and ``device`` is set to ``"cpu"``: SegExplain places the network
itself.

Example:
    >>> pipeline = open_bundle("spleen_ct_segmentation")
    >>> result = explain_case(pipeline, image, geometry, PredictedRegion(class_index=1), "integrated_gradients")
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.api import METHODS
from ..engine.method import rule_free_methods
from ..errors import SegExplainError
from .allowlist import TRUST_ADVICE
from .bundle_inferer import WINDOW_OPTIONS, bundle_sliding_window, read_inferer
from .bundle_safety import SkippedLoader, refuse_unknown_arguments, refuse_untrusted_config
from .bundle_transforms import affine_ras, transform_step
from .loading import load_weights
from .protocol import Pipeline, PreparedCase

__all__ = ["BundlePipeline", "open_bundle", "read_sequence_names"]

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


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
        affine = torch.as_tensor(affine_ras(geometry))
        array = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 2, 1)))  # MONAI's (C, x, y, z)
        meta = {"original_affine": affine.clone(), "spatial_shape": np.asarray(array.shape[1:]),
                "original_channel_dim": 0, "space": "RAS", "filename_or_obj": "case"}
        current = MetaTensor(array, affine=affine, meta=meta)
        steps, applied, skipped = [], [], []
        for transform in self.transforms:
            if isinstance(transform, SkippedLoader):
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
            step = transform_step(name, current, output)
            if step is not None:
                steps.append(step)
            applied.append(name)
            current = output
        network_input = current.as_tensor().detach().to(torch.float32).cpu().numpy()
        model, window = bundle_sliding_window(self.inferer, self.network, tuple(network_input.shape[1:]))
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
    inferer_class, inferer_options = read_inferer(parser, source)
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
            for k in WINDOW_OPTIONS if k in defaults}}
    return BundlePipeline(folder, network=network, weights=weights, transforms=transforms, inferer=inferer,
                          image_key=image_key, sequences=sequences, classes=classes, metadata=metadata,
                          config_file=config_file, trusted_code=trusted_code)
