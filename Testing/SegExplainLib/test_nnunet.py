"""nnU-Net v2 results folders, on a model made by nnunetv2's own planner and trainer (``Testing/nnunet_fixture.py``)."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegExplainLib.engine.api import explain
from SegExplainLib.engine.targets import BoxTarget, MaskTarget, VoxelTarget
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends.cli import main
from SegExplainLib.io.imaging import Geometry, read_sequences
from SegExplainLib.models.nnunet import open_nnunet
from SegExplainLib.models.pipelines import explain_case, sequence_names

PLANS_SPACING = (0.8, 0.8, 2.0)
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)  # 30 degrees about the slice axis


def _case(shape_dhw, spacing=PLANS_SPACING, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed=1):
    """Two sequences with a lesion, inside a border of zeros that nnU-Net crops away."""
    rng = np.random.default_rng(seed)
    image = np.zeros((2, *shape_dhw), np.float32)
    image[:, 1:-1, 2:-2, 2:-2] = rng.normal(200.0, 15.0, (2, shape_dhw[0] - 2, shape_dhw[1] - 4, shape_dhw[2] - 4))
    centre = [n // 2 for n in shape_dhw]
    lesion = tuple(slice(c - 2, c + 2) for c in centre)
    image[(0, *lesion)] += 60.0
    image[(1, *lesion)] -= 40.0
    geometry = Geometry(spacing=spacing, origin=(-10.0, 5.0, 3.0), direction=direction,
                        size=tuple(reversed(shape_dhw)))
    return image, geometry, tuple(centre)


def _with_fold_subset(folder, tmp_path, folds):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(*[f"fold_{f}" for f in (0, 1) if f not in folds]))
    return copy


def test_explained_function_is_nnunets_inference(nnunet_model, monkeypatch):
    """Logits of the explained function equal those of nnU-Net's own predictor: window, Gaussian, mirroring, folds.

    nnU-Net makes its Gaussian and accumulates the blend in float16, where the tiny weights at a patch's border
    lose most of their digits; its own code run in float32 is the reference.
    """
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pipeline = open_nnunet(nnunet_model)
    assert pipeline.describe()["folds"] == ["0", "1"] and pipeline.mirror_axes == (0, 1, 2)
    image, geometry, _ = _case((18, 28, 24))  # two windows along the first axis
    prepared = pipeline.prepare(image, geometry)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(nnunet_model), use_folds=(0, 1))
    gaussian = predict_from_raw_data.compute_gaussian
    monkeypatch.setattr(predict_from_raw_data, "compute_gaussian",
                        lambda *args, **kwargs: gaussian(*args, **{**kwargs, "dtype": torch.float32}))
    monkeypatch.setattr(torch, "half", torch.float32)  # the accumulators
    expected = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(prepared.input)).float()
    calls = []
    pipeline.model.network.networks[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        logits = pipeline.model(torch.from_numpy(prepared.input)[None])[0]
    assert len(calls) == 2 * 8  # two windows, each with the seven mirrored inputs
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_relevance_of_the_fold_average_is_the_average_relevance(nnunet_model, tmp_path):
    image, geometry, centre = _case((16, 28, 24))
    target = VoxelTarget(centre, radius=1.5, class_index=1)
    maps = {}
    for folds in ((0,), (1,), (0, 1)):
        pipeline = open_nnunet(nnunet_model, folds=folds, mirroring=False)
        result = explain_case(pipeline, image, geometry, target, "lrp", composite="epsilon_plus",
                              dtype=torch.float64)
        assert result.relative_delta < 1e-4  # conserved through the ensemble, up to epsilon and biases
        maps[folds] = result.maps
    np.testing.assert_allclose(maps[(0, 1)], (maps[(0,)] + maps[(1,)]) / 2, rtol=1e-6, atol=1e-9)


def test_mirroring_averages_the_relevance_of_mirrored_inputs(nnunet_model, tmp_path):
    """Reference: each fold network explained alone on every mirrored input, mirrored back, averaged."""
    pipeline = open_nnunet(_with_fold_subset(nnunet_model, tmp_path, (0,)))
    image, geometry, centre = _case((16, 28, 24))
    prepared = pipeline.prepare(image, geometry)
    region = prepared.region_to_network(VoxelTarget(centre, class_index=1).region(torch.zeros(2, *image.shape[1:])))
    result = explain(pipeline.model, prepared.input, MaskTarget(region, class_index=1), "lrp",
                     composite="epsilon_plus", dtype=torch.float64)
    network = pipeline.model.network.networks[0]
    reference = np.zeros_like(result.maps)
    flips = [()] + [axes for count in (1, 2, 3) for axes in itertools.combinations((1, 2, 3), count)]
    for axes in flips:
        flipped = explain(network, np.flip(prepared.input, axes).copy(),
                          MaskTarget(np.flip(region, [a - 1 for a in axes]).copy(), class_index=1), "lrp",
                          composite="epsilon_plus", dtype=torch.float64).maps
        reference += np.flip(flipped, axes) / len(flips)
    np.testing.assert_allclose(result.maps, reference, rtol=1e-6, atol=1e-9)


def test_maps_land_on_the_original_oblique_anisotropic_grid_as_sums(nnunet_model, tmp_path):
    pipeline = open_nnunet(nnunet_model, folds=(0,), mirroring=False)
    image, geometry, centre = _case((12, 30, 34), spacing=(0.7, 0.9, 2.5), direction=OBLIQUE)
    prepared = pipeline.prepare(image, geometry)
    assert prepared.input.shape[1:] != image.shape[1:]  # resampled to the plans' spacing
    assert prepared.record["crop"] == [[1, 11], [2, 28], [2, 32]]
    result = explain_case(pipeline, image, geometry, VoxelTarget(centre, radius=2.0, class_index=1), "lrp",
                          composite="epsilon_plus", dtype=torch.float64, prepared=prepared)
    assert result.maps.shape == image.shape
    # sums: the way back keeps the network-grid total exactly, and that total is the score up to epsilon and biases
    network_total = result.expected_sum + result.delta
    assert result.maps.sum() == pytest.approx(network_total, rel=1e-9)
    assert result.relative_delta < 0.01
    assert not result.maps[:, 0].any() and not result.maps[:, :, :2].any()  # cropped away: no relevance
    assert result.target["kind"] == "voxel" and result.extras["network_target"]["kind"] == "mask"
    assert result.extras["pipeline"]["network_shape"] == list(prepared.input.shape[1:])


def test_a_click_maps_to_the_network_voxel_at_the_same_place(nnunet_model):
    pipeline = open_nnunet(nnunet_model, folds=(0,), mirroring=False)
    image, geometry, _ = _case((12, 30, 34), spacing=(0.7, 0.9, 2.5))
    prepared = pipeline.prepare(image, geometry)
    crop = [start for start, _ in prepared.record["crop"]]
    cropped = [b - a for a, b in prepared.record["crop"]]
    for click in [(5, 10, 20), (2, 25, 4), (9, 14, 30)]:
        region = np.zeros(image.shape[1:], bool)
        region[click] = True
        mapped = np.argwhere(prepared.region_to_network(region))
        # voxel centres: continuous network index = (i - crop + 0.5) * network / cropped size - 0.5
        expected = [(i - c + 0.5) * n / m - 0.5 for i, c, n, m in zip(click, crop, prepared.input.shape[1:], cropped)]
        assert len(mapped) >= 1
        assert np.all(np.abs(mapped - expected) <= 1.0)


def test_a_region_outside_the_crop_is_refused(nnunet_model):
    pipeline = open_nnunet(nnunet_model, folds=(0,), mirroring=False)
    image, geometry, _ = _case((16, 28, 24))
    with pytest.raises(SegExplainError, match="outside the part of the image the network sees"):
        explain_case(pipeline, image, geometry, BoxTarget((0, 0, 0), (1, 2, 2), class_index=1), "gradient")


def test_sequences_and_classes_come_from_dataset_json(nnunet_model):
    pipeline = open_nnunet(nnunet_model.parent)  # the dataset folder finds the 3d_fullres model
    assert pipeline.sequences == ["T2", "ADC"]
    assert pipeline.classes == ["background", "lesion"]
    image, geometry, _ = _case((16, 28, 24))
    with pytest.raises(SegExplainError, match=r"C = 2 channels \(T2, ADC\)"):
        pipeline.prepare(image[:1], geometry)
    # what a front end matches volumes with, read from dataset.json alone (no checkpoint is opened)
    assert sequence_names("nnunet", nnunet_model) == sequence_names("nnunet", nnunet_model.parent) == ["T2", "ADC"]
    with pytest.raises(SegExplainError, match="has no trained model of configuration '3d_lowres'"):
        sequence_names("nnunet", nnunet_model.parent, configuration="3d_lowres")


def test_folder_errors_name_what_is_missing(nnunet_model, tmp_path):
    with pytest.raises(SegExplainError, match="is not a folder"):
        open_nnunet(tmp_path / "nowhere")
    with pytest.raises(SegExplainError, match="no trained model of configuration '3d_lowres'.*3d_fullres"):
        open_nnunet(nnunet_model.parent, configuration="3d_lowres")
    with pytest.raises(SegExplainError, match=r"fold 3 has no checkpoint_final.pth.*fold_0, fold_1"):
        open_nnunet(nnunet_model, folds=(3,))
    with pytest.raises(SegExplainError, match="checkpoint must be one of"):
        open_nnunet(nnunet_model, checkpoint="model.pkl")
    with pytest.raises(SegExplainError, match=r"tile_step_size must lie in \(0, 1\], got 0"):
        open_nnunet(nnunet_model, tile_step_size=0)


def test_two_dimensional_configurations_are_refused(nnunet_model, tmp_path):
    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    shutil.copytree(nnunet_model, folder)
    with pytest.raises(SegExplainError, match="configuration '2d' is two-dimensional"):
        open_nnunet(folder)


def test_plans_naming_other_code_are_refused_unless_trusted(nnunet_model, tmp_path):
    folder = _with_fold_subset(nnunet_model, tmp_path, (0,))
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "evil.module.Network"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(SegExplainError, match="names architecture.network_class_name 'evil.module.Network'.*--trust-model-code"):
        open_nnunet(folder)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_checkpoints_are_read_without_running_code(nnunet_model, tmp_path):
    folder = _with_fold_subset(nnunet_model, tmp_path, (0,))
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    torch.save({**checkpoint, "payload": _Payload()}, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SegExplainError, match="cannot be read as weights only"):
        open_nnunet(folder)


def _write_case(image, geometry, folder):
    paths = []
    for channel, name in enumerate(("t2", "adc")):
        volume = sitk.GetImageFromArray(image[channel])
        volume.SetSpacing(geometry.spacing)
        volume.SetOrigin(geometry.origin)
        volume.SetDirection(geometry.direction)
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(volume, str(paths[-1]))
    return paths


def test_command_line_explains_a_results_folder_onto_the_original_grid(nnunet_model, tmp_path, capsys):
    image, geometry, centre = _case((12, 30, 34), spacing=(0.7, 0.9, 2.5), direction=OBLIQUE)
    paths = _write_case(image, geometry, tmp_path)
    output = tmp_path / "out"
    code = main(["explain", "--nnunet", str(nnunet_model), "--folds", "0", "--no-mirroring", "--input",
                 *map(str, paths), "--voxel", *map(str, centre), "--method", "gradient", "--output", str(output),
                 "--no-figures"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sequence_names"] == ["T2", "ADC"]
    assert summary["model"]["kind"] == "nnunet" and summary["model"]["folds"] == ["0"]
    maps, written = read_sequences([output / name for name in summary["files"][:2]])
    assert maps.shape == image.shape
    assert written.differences(read_sequences(paths)[1]) == []  # the input's grid, oblique and anisotropic
    assert np.abs(maps).sum() > 0


def test_command_line_refuses_nnunet_options_without_nnunet(tmp_path, capsys):
    code = main(["explain", "--card", "x.yaml", "--folds", "0", "--input", "a.nii", "--output", str(tmp_path / "o")])
    assert code != 0
    assert "--folds belong to --nnunet" in capsys.readouterr().err


def test_deeplift_explains_nnunet_with_its_instance_norms_and_keeps_its_sum_rule(nnunet_model, tmp_path, capsys):
    """nnU-Net's InstanceNorm3d has no running statistics: DeepLIFT's norm rule carries the sum rule through it."""
    image, geometry, centre = _case((12, 30, 34))
    paths = _write_case(image, geometry, tmp_path)
    output = tmp_path / "out"
    code = main(["explain", "--nnunet", str(nnunet_model), "--folds", "0", "--input", *map(str, paths), "--voxel",
                 *map(str, centre), "--radius", "2", "--method", "deeplift", "--output", str(output), "--no-figures"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    assert summary["method"] == "deeplift" and summary["expected_sum"] != 0
    assert abs(summary["delta"]) < 1e-3 * abs(summary["expected_sum"])


def test_segment_matrix_of_a_label_map_on_the_original_grid_equals_one_explanation_per_class(nnunet_model, tmp_path,
                                                                                              capsys):
    from SegExplainLib.engine.targets import PredictedRegion
    from SegExplainLib.models.pipelines import segment_matrix_case

    pipeline = open_nnunet(nnunet_model, folds=(0,), mirroring=False)
    image, geometry, centre = _case((12, 30, 34), spacing=(0.7, 0.9, 2.5), direction=OBLIQUE)
    labels = np.zeros(image.shape[1:], np.int64)
    labels[:, :, centre[2]:] = 2  # two halves of another grid than the network's
    labels[tuple(slice(c - 2, c + 2) for c in centre)] = 1
    matrix = segment_matrix_case(pipeline, image, geometry, "gradient", segmentation=labels, device="cpu")
    assert matrix.rows == ["background", "lesion"] and matrix.columns == ["background", "lesion", "label 2"]
    predicted = segment_matrix_case(pipeline, image, geometry, "gradient", device="cpu")
    assert predicted.columns == ["background", "lesion"] and predicted.segmentation == "predicted"
    for k, status in enumerate(matrix.status):
        if status == "not predicted":
            continue
        maps = explain_case(pipeline, image, geometry, PredictedRegion(class_index=k), "gradient", device="cpu").maps
        for j in range(3):
            inside = maps[:, labels == j]
            assert matrix.positive[k, j] == pytest.approx(np.clip(inside, 0, None).sum(), rel=1e-5, abs=1e-9)
    assert "explained" in matrix.status
    paths = _write_case(image, geometry, tmp_path)  # the command line writes and prints the same matrix
    label_path = tmp_path / "organs.nii.gz"
    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.SetSpacing(geometry.spacing)
    label_image.SetOrigin(geometry.origin)
    label_image.SetDirection(geometry.direction)
    sitk.WriteImage(label_image, str(label_path))
    code = main(["explain", "--nnunet", str(nnunet_model), "--folds", "0", "--no-mirroring", "--input",
                 *map(str, paths), "--method", "gradient", "--device", "cpu", "--segment-matrix", "--segment-labels",
                 str(label_path), "--output", str(tmp_path / "out"), "--no-figures"])
    assert code == 0
    assert "segment matrix (gradient, batched passes: 1)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "out" / "summary.json").read_text())["segment_matrix"]
    np.testing.assert_allclose(recorded["positive_sums"], matrix.positive, rtol=1e-5)
