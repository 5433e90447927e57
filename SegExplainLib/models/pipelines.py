"""Every kind of model, opened by name as a :class:`~SegExplainLib.models.protocol.Pipeline`.

The kinds are a constant table of this module's own imports: a model file never names the code that opens it. The
protocol, the prepared case, the ways between the grids and :func:`explain_case` live in
:mod:`~SegExplainLib.models.protocol` (which knows no kind) and are exported here too.

Example:
    >>> pipeline = open_pipeline("card", "models/prostate.yaml")
    >>> sequence_names("nnunet", "nnUNet_results/Dataset001_Prostate")     # read from dataset.json, nothing built
    ['T2', 'ADC']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import SegExplainError
from . import monai_bundle, network_pipeline, nnunet
from .protocol import (
                       Pipeline,
                       PreparedCase,
                       explain_case,
                       region_to_grid,
                       relevance_from_grid,
                       segment_matrix_case,
)

__all__ = ["PIPELINES", "Pipeline", "PreparedCase", "explain_case", "open_pipeline", "region_to_grid",
           "relevance_from_grid", "segment_matrix_case", "sequence_names"]

#: Pipeline kinds: the function that opens one from a path (or spec) and keyword options.
PIPELINES: dict[str, Callable[..., Pipeline]] = {
    "card": network_pipeline.open_card,
    "spec": network_pipeline.open_spec,
    "nnunet": nnunet.open_nnunet,
    "bundle": monai_bundle.open_bundle,
}


def open_pipeline(kind: str, path: Any, **options: Any) -> Pipeline:
    """Open a model of any kind as a pipeline.

    Args:
        kind: ``"card"`` (a model card file), ``"spec"`` (a model spec such as ``"reference"`` or
            ``"file.py:Class"``), ``"nnunet"`` (a results folder of nnU-Net v2) or ``"bundle"`` (a MONAI bundle).
        path: The card file, the spec, or the folder.
        **options: Options of that kind: ``trust_code``, ``patch_size``, ``overlap`` for a card (and ``kwargs``,
            ``weights`` for a spec, see :mod:`~SegExplainLib.models.network_pipeline`); e.g.
            ``configuration="3d_fullres", folds=(0, 1)`` for nnU-Net.

    Raises:
        SegExplainError: Unknown kind, or the model cannot be opened, or would run code without ``trust_code``
            (the message says why).
    """
    if kind not in PIPELINES:
        raise SegExplainError(f"unknown pipeline kind {kind!r}; expected one of {', '.join(PIPELINES)}")
    return PIPELINES[kind](path, **options)


def sequence_names(kind: str, path: Any, *, configuration: str | None = None, trust_code: bool = False) -> list[str]:
    """The input sequence names of a model, read from its description files without building the network.

    What a front end needs to match a case's volumes or files to the model's channels, before anything runs: a
    model card's ``sequences``, an nnU-Net results folder's ``dataset.json`` ``channel_names`` (of the model folder of
    ``configuration``, as :func:`open_pipeline` picks it), a MONAI bundle's ``configs/metadata.json``
    (``network_data_format.inputs.<image>.channel_def`` or ``num_channels``). The names are those of
    ``open_pipeline(kind, path).sequences``; only a bundle whose metadata does not give them is opened (its network
    built, which ``trust_code`` may allow to run its code).

    Args:
        kind: ``"card"`` (a model card file), ``"nnunet"`` or ``"bundle"``.
        path: The card file or the model folder.
        configuration: nnU-Net configuration (default ``3d_fullres``) when ``path`` is the dataset folder.
        trust_code: Passed on when a bundle must be opened.

    Raises:
        SegExplainError: Unknown kind, a missing file or folder, or description files that do not name the
            sequences; the message names the path.

    Example:
        >>> sequence_names("nnunet", "nnUNet_results/Dataset001_Prostate/nnUNetTrainer__nnUNetPlans__3d_fullres")
        ['T2', 'ADC']
    """
    if kind == "card":
        return network_pipeline.read_sequence_names(path)
    if kind == "nnunet":
        return nnunet.read_sequence_names(path, configuration=configuration)
    if kind != "bundle":
        raise SegExplainError(f"unknown model kind {kind!r}; expected card, nnunet, bundle")
    # a bundle whose metadata does not name its channels is opened: its network says how many
    return monai_bundle.read_sequence_names(path) or list(open_pipeline(kind, path, trust_code=trust_code).sequences)
