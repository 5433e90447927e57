"""Perturbation methods: what the score does when parts of the input are replaced by a reference.

They run forward passes only, so they explain any network, TorchScript included, and they answer without a
propagation rule. :class:`SequenceShapley` gives each MRI sequence its exact Shapley value, :class:`SupervoxelShapley`
estimates the Shapley values of 3D blocks by permutation sampling, :class:`Rise` averages random masks weighted by
the score they keep, and :class:`ScoreCAM` masks the input with a layer's upsampled activations.

Each explains, for each batch element ``b``, the scalar score ``sum(seed[b] * model(inputs)[b])`` (see
:mod:`SegExplainLib.engine.method`). Their perturbed inputs are stacked along the batch dimension,
``internal_batch_size`` at a time (chosen from a memory budget when ``None``, see
:mod:`SegExplainLib.engine.batching`). Forward passes run without gradient; when ``seed.requires_grad`` the scores are
formed differentiably from the stored outputs (each score is linear in the seed), so the maps of the seed-linear ones
can be differentiated w.r.t. the seed.
"""

from .rise import Rise
from .score_cam import ScoreCAM
from .sequence_shapley import SequenceShapley
from .supervoxel_shapley import SupervoxelShapley

__all__ = ["SequenceShapley", "SupervoxelShapley", "Rise", "ScoreCAM"]
