"""The model a front end asks to explain: a model card, a model spec, an nnU-Net results folder or a MONAI bundle.

A :class:`ModelSource` names the model and carries the user's word that it may run code of someone else
(``trust_code``, ``--trust-model-code``): never the model's. It is checked when made, converts to and from JSON (the
worker's and Ray's messages) and to the options of ``segexplain explain`` (:meth:`ModelSource.arguments`); the
command line builds its model options from its fields (:func:`add_model_arguments`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SegExplainError
from . import options as opt

#: The kinds of model: a model card file, a model spec (with keyword arguments and weights), an nnU-Net v2 results
#: folder, a MONAI bundle folder.
MODEL_KINDS = ("card", "spec", "nnunet", "bundle")
#: How messages name each kind.
MODEL_WHAT = {"card": "model card", "spec": "model spec", "nnunet": "nnU-Net results folder", "bundle": "MONAI bundle"}
_NNUNET_FIELDS = ("configuration", "folds", "checkpoint", "mirroring")
_SPEC_FIELDS = ("spec", "kwargs", "weights")
_WINDOW_FIELDS = ("patch_size", "overlap")


def parse_folds(text: Any) -> tuple[str, ...]:
    """nnU-Net folds from a text such as ``"0 1"`` or ``"0, 1"`` (or a sequence); empty for every trained fold.

    Raises:
        SegExplainError: A fold that is neither a fold number nor ``all``.
    """
    items = re.split(r"[\s,;]+", text.strip()) if isinstance(text, str) else [str(f) for f in (text or ())]
    folds = tuple(item for item in items if item)
    bad = [fold for fold in folds if not (fold.isdigit() or fold == "all")]
    if bad:
        raise SegExplainError(f"folds must be fold numbers (0, 1, ...) or 'all', got {', '.join(map(repr, bad))}")
    return folds


@dataclasses.dataclass(frozen=True)
class ModelSource(opt.JsonFields):
    """The explained model, and the user's word on its code.

    Attributes:
        kind: One of :data:`MODEL_KINDS`.
        path: The card file (empty: the bundled demo card), or the nnU-Net results folder or bundle folder.
        spec: ``spec``: the model spec (``reference``, ``monai:UNet``, ``file.py:Class``...).
        kwargs: ``spec``: the model's keyword arguments.
        weights: ``spec``: the state dict file.
        configuration: nnU-Net configuration; empty for ``3d_fullres``.
        folds: nnU-Net folds to average (``"0 1"``, ``("0", "1")``); empty for every trained fold.
        checkpoint: nnU-Net checkpoint file of each fold.
        mirroring: nnU-Net: average over the mirrored inputs the trainer allowed.
        patch_size: ``card``/``spec``: run the network by overlapping windows of this size (default: the card's).
        overlap: ``card``/``spec``: overlap of the windows.
        trust_code: The user's word that the model may import or run code of someone else.

    Example:
        >>> ModelSource("nnunet", "/results/Dataset001", folds="0", mirroring=False).arguments()
        ['--nnunet', '/results/Dataset001', '--folds', '0', '--no-mirroring']
    """

    kind: str = opt.option("card")
    path: str = opt.option("")
    spec: str = opt.option("", "--model", metavar="SPEC", help=(
        "'reference', 'unet3d', 'monai:UNet', 'torch.nn:Conv3d', 'file.py:Class', 'package.module:factory' or "
        "'pickle:FILE' (the last three run code: --trust-model-code)"))
    kwargs: dict[str, Any] = opt.option({}, "--model-kwargs", metavar="JSON", help="keyword arguments of the model",
                                        write=lambda value: [json.dumps(value)])
    weights: str | None = opt.option(None, "--weights", metavar="FILE",
                                     help="state dict (.pt with weights_only, or .safetensors)")
    configuration: str = opt.option("", "--configuration", help="nnU-Net configuration (default 3d_fullres)")
    folds: tuple[str, ...] = opt.option((), "--folds", nargs="+", metavar="FOLD",
                                        help="nnU-Net folds to average (default: all trained)")
    checkpoint: str = opt.option("checkpoint_final.pth", "--checkpoint",
                                 help="nnU-Net checkpoint file of each fold (default checkpoint_final.pth)")
    mirroring: bool = opt.option(True, "--no-mirroring", switch=True,
                                 help="nnU-Net: do not average over mirrored inputs")
    patch_size: tuple[int, int, int] | None = opt.option(
        None, "--patch-size", nargs=3, type=int, metavar="N",
        help="run the network by overlapping windows of this size (default: the card's patch_size)")
    overlap: float = opt.option(0.5, "--overlap", type=float, help="overlap of the windows (default 0.5)")
    trust_code: bool = opt.option(False, "--trust-model-code", switch=True, help=(
        "allow a model (of --model, the card, the nnU-Net plans or the bundle) that imports or runs code of someone "
        "else: a model file, a module outside the built-in networks, MONAI and torch.nn, or a pickle"))

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        opt.check_text("model kind", self.kind, choices=MODEL_KINDS)
        put("path", str(opt.check_text("path", self.path)))
        opt.check_text("spec", self.spec)
        opt.check_dict("kwargs", self.kwargs)
        opt.check_text("weights", self.weights, optional=True)
        put("configuration", opt.check_text("configuration", self.configuration).strip())
        put("folds", parse_folds(self.folds))
        opt.check_text("checkpoint", self.checkpoint)
        opt.check_bool("mirroring", self.mirroring)
        put("patch_size", opt.check_tuple("patch_size", self.patch_size, length=3, kind=int, optional=True))
        opt.check_number("overlap", self.overlap, minimum=0.0, below=1.0)
        opt.check_bool("trust_code", self.trust_code)
        if self.patch_size is not None and any(size < 1 for size in self.patch_size):
            raise SegExplainError(f"patch_size must be 3 integers >= 1, got {self.patch_size!r}")
        self._refuse_options_of_other_kinds()

    def _refuse_options_of_other_kinds(self) -> None:
        given = [name for name in (*_NNUNET_FIELDS, *_SPEC_FIELDS, *_WINDOW_FIELDS)
                 if getattr(self, name) != opt.default_of(ModelSource, name)]
        nnunet = [("mirroring off" if name == "mirroring" else name) for name in given if name in _NNUNET_FIELDS]
        if nnunet and self.kind != "nnunet":
            raise SegExplainError(f"{', '.join(nnunet)} belong to an nnU-Net results folder, not a "
                                  f"{MODEL_WHAT[self.kind]}")
        if any(name in _WINDOW_FIELDS for name in given) and self.kind in ("nnunet", "bundle"):
            raise SegExplainError("--patch-size is for --model/--card: nnU-Net and MONAI bundles bring their own "
                                  "sliding window")
        spec = [name for name in given if name in _SPEC_FIELDS]
        if spec and self.kind != "spec":
            raise SegExplainError(f"{', '.join(spec)} belong to a model spec, not a {MODEL_WHAT[self.kind]}")
        if self.kind == "spec" and not self.spec:
            raise SegExplainError("a model of kind 'spec' needs its spec, e.g. 'reference'")
        if self.kind == "spec" and self.path:
            raise SegExplainError(f"a model spec has no path (its file is in the spec), got path {self.path!r}")

    @property
    def location(self) -> str:
        """The card file or folder, the bundled demo card for an empty card path."""
        if self.kind == "card" and not self.path:
            from ..models.demo_card import demo_card_path

            return str(demo_card_path())
        return self.path

    def check(self, *, advice: str | None = None) -> None:
        """Refuse a missing card or folder, and a card or spec whose model would run code without :attr:`trust_code`
        (the message ends with ``advice``, how the user's front end allows it; default: the command line's way).

        The plans of an nnU-Net folder and the configuration of a bundle are checked when they are opened.
        """
        from ..models.loading import ModelCard, refuse_untrusted_code
        from ..models.network_pipeline import CODE_ADVICE

        what, advice = MODEL_WHAT[self.kind], CODE_ADVICE if advice is None else advice
        if self.kind == "card":
            if not Path(self.location).is_file():
                raise SegExplainError(f"{what} {self.location!r} is not a file")
            refuse_untrusted_code(ModelCard.read(self.location).model, f"{what} {self.location!r}",
                                  trusted=self.trust_code, advice=advice)
        elif self.kind == "spec":
            refuse_untrusted_code(self.spec, f"--model {self.spec!r}", trusted=self.trust_code, advice=advice)
        elif not self.path:
            raise SegExplainError(f"choose the {what} to explain")
        elif not Path(self.path).is_dir():
            raise SegExplainError(f"{what} {self.path!r} is not a folder")

    def sequence_names(self) -> list[str]:
        """The model's input sequences, read from its description files (no network is built, see
        :func:`SegExplainLib.models.pipelines.sequence_names`); empty for a model spec, which names none."""
        from ..models.pipelines import sequence_names

        if self.kind == "spec":
            return []
        dataclasses.replace(self, trust_code=True).check()  # the paths only: nothing of the model runs here
        return sequence_names(self.kind, self.location, configuration=self.configuration or None)

    def arguments(self) -> list[str]:
        """The ``segexplain explain`` options naming this model (and ``--trust-model-code`` when given)."""
        first = {"card": ["--card", self.location], "spec": ["--model", self.spec], "nnunet": ["--nnunet", self.path],
                 "bundle": ["--bundle", self.path]}[self.kind]
        return [*first, *opt.words(self, ("kwargs", "weights", "configuration", "folds", "checkpoint", "mirroring",
                                          "patch_size", "overlap", "trust_code"))]

    @classmethod
    def from_arguments(cls, arguments: Sequence[str]) -> ModelSource:
        """The model of ``segexplain explain``'s model options, e.g. ``["--card", "prostate.yaml"]`` (the inverse of
        :meth:`arguments`)."""
        parser = opt.WordParser(prog="model options", add_help=False)
        add_model_arguments(parser)
        return cls.from_namespace(parser.parse_args([str(word) for word in arguments]))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ModelSource:
        """The model of a parsed ``segexplain explain`` command line (see :func:`add_model_arguments`).

        Raises:
            SegExplainError: No model, two models, nnU-Net options without ``--nnunet``, or a bad value.
        """
        models_given(args, {"--card": "card", "--model": "spec", "--nnunet": "nnunet", "--bundle": "bundle"},
                     together=("--card", "--model"))
        common = {"trust_code": args.trust_code}
        if args.nnunet or args.bundle:
            if args.patch_size:
                raise SegExplainError("--patch-size is for --model/--card: nnU-Net and MONAI bundles bring their own "
                                      "sliding window")
            if args.bundle:
                return cls("bundle", args.bundle, **common)
            return cls("nnunet", args.nnunet, configuration=args.configuration or "", folds=tuple(args.folds or ()),
                       checkpoint=args.checkpoint, mirroring=args.mirroring, **common)
        window = {"patch_size": tuple(args.patch_size) if args.patch_size else None, "overlap": args.overlap}
        if args.card:  # a card names its network and weights: --model and --weights are not used
            return cls("card", args.card, **window, **common)
        if args.spec:
            return cls("spec", spec=args.spec, kwargs=opt.json_text(args.kwargs, "--model-kwargs"),
                       weights=args.weights, **window, **common)
        from ..models.demo_card import demo_card_path

        raise SegExplainError(f"no model given: pass --card FILE (a model card: network, weights, sequences, "
                              f"normalization) or --model SPEC with --weights FILE; to try the bundled demo network, "
                              f"pass --card {demo_card_path()}")


def models_given(args: argparse.Namespace, flags: dict[str, str], *, together: Sequence[str] = ()) -> list[str]:
    """The model options of ``flags`` (option to its destination in ``args``) that were given, one model at most
    (``together`` may be given jointly); nnU-Net's options need ``--nnunet``."""
    models = [flag for flag, dest in flags.items() if getattr(args, dest)]
    if len(models) > 1 and models != list(together):
        raise SegExplainError(f"{' and '.join(models)} each name a model; pass one")
    nnunet_options = [flag for flag, given in (("--configuration", args.configuration), ("--folds", args.folds),
                                               ("--no-mirroring", not args.mirroring)) if given]
    if nnunet_options and not args.nnunet:
        raise SegExplainError(f"{', '.join(nnunet_options)} belong to --nnunet, which was not given")
    return models


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming the model (``--card``, ``--model``, ``--nnunet``, ``--bundle`` and theirs), with the
    defaults and help of :class:`ModelSource`."""
    model = parser.add_argument_group("model")
    opt.add_options(model, ModelSource, ("spec",))
    model.add_argument("--model-kwargs", dest="kwargs", default=json.dumps(opt.default_of(ModelSource, "kwargs")),
                       metavar="JSON", help=opt.flag_of(ModelSource, "kwargs").help)
    opt.add_options(model, ModelSource, ("weights",))
    model.add_argument("--card", metavar="FILE", help="model card (YAML/JSON): model, weights, sequences, "
                                                      "normalization; overrides --model/--weights")
    model.add_argument("--nnunet", metavar="FOLDER",
                       help="an nnU-Net v2 results folder (Dataset.../Trainer__Plans__configuration, or the dataset "
                            "folder): nnU-Net's network, preprocessing, sliding window, mirroring and folds")
    add_nnunet_arguments(model)
    model.add_argument("--bundle", metavar="FOLDER", help="a MONAI bundle folder (configs/inference.json, "
                                                          "models/model.pt or model.ts)")
    opt.add_options(model, ModelSource, ("trust_code",))
    opt.add_options(model, ModelSource, ("patch_size", "overlap"))


def add_nnunet_arguments(group: Any, *, checkpoint: bool = True) -> None:
    """The options of an nnU-Net results folder (``--configuration``, ``--folds``, ``--checkpoint``,
    ``--no-mirroring``), with the defaults and help of :class:`ModelSource`."""
    opt.add_options(group, ModelSource, ("configuration", "folds", *(("checkpoint",) if checkpoint else ())))
    group.add_argument("--no-mirroring", dest="mirroring", action="store_false",
                       help=opt.flag_of(ModelSource, "mirroring").help)
