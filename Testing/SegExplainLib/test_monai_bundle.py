"""MONAI bundles through ``explain_case``: bundles made by MONAI's own tooling, checked against MONAI itself.

The bundle is written by ``monai.bundle.init_bundle`` (configs/inference.json, configs/metadata.json and
models/model.pt from a tiny UNet's state dict); its TorchScript twin by ``monai.bundle.ckpt_export``. The
preprocessing is the spleen bundle's pattern: LoadImaged, EnsureChannelFirstd, Orientationd(RAS), Spacingd to
1.5 mm, NormalizeIntensityd, EnsureTyped(device=@device), with a SlidingWindowInferer of 8^3 patches. The case has
an oblique direction with flips and 1 x 1.25 x 3 mm voxels, so reorientation and resampling both do something.

The case is written to NIfTI files and read by SegExplain's ``read_sequences``, as a user's case is. References are
MONAI's own: the same files read by MONAI's LoadImaged as the bundle names it (SegExplain never builds it) and
preprocessed by the bundle's own transforms
(geometry conversion included), autograd through MONAI's transforms for the way back, MONAI's Spacingd of a label
image for regions.

Measured (torch 2.13 CPU, monai 1.6.1; ``pytest -s`` prints them): network grid (2, 11, 12, 11) from a
(2, 6, 14, 16) case. LRP epsilon_plus in float64 through 8 windows: network-grid total 9.36822561988054, the same
on the original grid to all 15 digits, |delta| / |expected| = 2.5e-6. In-memory vs file-based preprocessing: 1.7e-6
(float32 affines in the NIfTI header). Way back vs autograd through MONAI: 6e-8 to 1.2e-7 for every supported
transform (MONAI's Spacingd returns float32 even for float64 input), totals equal to 1e-13 except where the bundle
pads. A 126-voxel box maps to the same 112 network voxels as MONAI's resampled label. The file runs in about 10 s.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from SegExplainLib.engine.api import explain
from SegExplainLib.engine.targets import BoxTarget, MaskTarget, PredictedRegion
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import Geometry, read_sequences
from SegExplainLib.models import pipelines
from SegExplainLib.models.pipelines import explain_case, open_pipeline, sequence_names

monai_bundle = pytest.importorskip("monai.bundle")
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("nibabel")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": [4, 8],
           "strides": [2], "norm": "batch"}
PREPROCESSING = [
    {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
    {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True},
    {"_target_": "EnsureTyped", "keys": "image", "device": "@device"},
]
# Keys that a bundle holds for MONAI's own runs; SegExplain never evaluates them, so they need no trust.
CONFIG = {
    "imports": ["$import glob"],
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "datalist": "$list(sorted(glob.glob(@bundle_root + '/*.nii.gz')))",
    "pixdim": [1.5, 1.5, 1.5],
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": PREPROCESSING},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [8, 8, 8], "sw_batch_size": 1, "overlap": 0.5,
                "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')"},  # read, never built
    "evaluating": ["$@evaluator.run()"],
}
METADATA = {"version": "0.1.0", "name": "tiny_prostate", "network_data_format": {
    "inputs": {"image": {"num_channels": 2, "channel_def": {"0": "T2", "1": "ADC"}}},
    "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "lesion"}}}}}


def _make_bundle(folder, config=None, network=None):
    network = network or _network()
    monai_bundle.init_bundle(folder, network=network, metadata_str=METADATA, inference_str=config or CONFIG)
    return folder


def _network():
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    return UNet(3, 2, 2, channels=(4, 8), strides=(2,), norm="batch")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _make_bundle(tmp_path_factory.mktemp("bundles") / "tiny_prostate")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """An oblique two-sequence case as SegExplain reads it from its NIfTI files: (image, geometry, files)."""
    angle = 0.4
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, 1.0, -1.0])
    geometry = Geometry((1.0, 1.25, 3.0), (10.0, -20.0, 5.0), tuple(direction.ravel()), (16, 14, 6))
    volumes = np.random.default_rng(0).normal(size=(2, *geometry.shape)).astype(np.float32)
    files = [_write(volume, geometry, tmp_path_factory.mktemp("case") / f"{name}.nii.gz")
             for volume, name in zip(volumes, ("t2", "adc"))]
    image, read_geometry = read_sequences(files)
    return image, read_geometry, files


def _write(volume, geometry, path):
    sitk.WriteImage(geometry.apply(sitk.GetImageFromArray(volume)), str(path))
    return path


def _monai_read(files, transforms):
    """Each file read by MONAI (the bundle's own LoadImaged) and run through ``transforms``: MetaTensors (1, x, y, z).
    One file per channel: the bundle normalizes channel-wise, so this is what it does to the two-channel case."""
    outputs = []
    for path in files:
        data = {"image": str(path)}
        for transform in transforms:
            data = transform(data)
        outputs.append(data["image"])
    return outputs


def _split(pipeline):
    """MONAI's own loading transforms as the bundle names them (SegExplain never builds them), and the bundle's
    spatial transform instances (Orientationd, Spacingd)."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    by_name = {type(t).__name__: t for t in pipeline.transforms}
    return ([LoadImaged(keys="image", reader="NibabelReader"), EnsureChannelFirstd(keys="image")],
            [by_name["Orientationd"], by_name["Spacingd"]])


def open_bundle_quiet(folder, **options):
    """The bundle opened; MONAI's deprecation notices about its own defaults are not this test's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_pipeline("bundle", folder, **options)


def _network_target(prepared, target, image):
    region = target.region(torch.zeros((2, *image.shape[1:])))
    return MaskTarget(prepared.region_to_network(region), class_index=target.class_index)


def test_lrp_through_the_sliding_window_comes_back_on_the_original_grid_with_its_total(bundle, case):
    image, geometry, _ = case
    pipeline = open_pipeline("bundle", bundle)
    assert (pipeline.kind, pipeline.sequences, pipeline.classes) == ("bundle", ["T2", "ADC"], ["background", "lesion"])
    result = explain_case(pipeline, image, geometry, PredictedRegion(class_index=1), "lrp", composite="epsilon_plus",
                          device="cpu", dtype=torch.float64)
    record = result.extras["pipeline"]
    network_total = result.expected_sum + result.delta
    print(f"\nnetwork grid {result.extras['network_map_shape']} from {image.shape}; network-grid total "
          f"{network_total:.15g}, original-grid total {result.maps.sum():.15g}, relative delta "
          f"{abs(result.delta) / abs(result.expected_sum):.2g}")
    assert result.maps.shape == image.shape
    assert result.extras["network_map_shape"] != list(image.shape)
    assert [(s["transform"], s["kind"]) for s in record["spatial_steps"]] == [
        ("Orientationd", "moved"), ("Spacingd", "resampled (bilinear)")]
    assert record["skipped"] == ["LoadImaged", "EnsureChannelFirstd"]
    assert record["patch_size"] == [8, 8, 8] and record["name"] == "tiny_prostate"
    assert abs(result.maps.sum() - network_total) <= 1e-9 * abs(network_total)
    assert abs(result.delta) <= 1e-3 * abs(result.expected_sum)


def test_preprocessing_in_memory_matches_monai_reading_the_files(bundle, case):
    image, geometry, files = case
    pipeline = open_bundle_quiet(bundle)
    prepared = pipeline.prepare(image, geometry)
    # the bundle's own transforms, all of them, on the case as files (channel-wise normalization: one file each)
    loading, _ = _split(pipeline)
    expected = np.concatenate([t.numpy() for t in _monai_read(files, [*loading, *pipeline.transforms[2:]])])
    print(f"\nin-memory vs file-based preprocessing: max difference {np.abs(prepared.input - expected).max():.2g}")
    np.testing.assert_allclose(prepared.input, expected, atol=1e-5)


def test_gradient_map_is_autograd_through_monais_own_transforms(bundle, case):
    image, geometry, files = case
    pipeline = open_bundle_quiet(bundle)
    prepared = pipeline.prepare(image, geometry)
    target = BoxTarget((2, 4, 5), (4, 9, 11), class_index=1)
    result = explain_case(pipeline, image, geometry, target, "gradient", prepared=prepared, device="cpu",
                          dtype=torch.float64)
    network_maps = explain(prepared.model, prepared.input, _network_target(prepared, target, image), "gradient",
                           device="cpu", dtype=torch.float64).maps
    loading, spatial = _split(pipeline)
    reference = []
    for channel, loaded in enumerate(_monai_read(files, loading)):
        leaf = loaded.as_tensor().to(torch.float64).requires_grad_(True)
        moved = {"image": type(loaded)(leaf, meta=loaded.meta)}
        for transform in spatial:
            moved = transform(moved)
        weights = torch.as_tensor(network_maps[channel:channel + 1])
        (back,) = torch.autograd.grad((moved["image"].as_tensor() * weights).sum(), leaf)
        reference.append(back[0].numpy().transpose(2, 1, 0))
    difference = np.abs(result.maps - np.stack(reference)).max() / np.abs(result.maps).max()
    print(f"\ngradient map vs autograd through MONAI: relative difference {difference:.2g}")
    assert difference < 1e-5




@pytest.mark.parametrize("extra", [
    [],
    [{"_target_": "Flipd", "keys": "image", "spatial_axis": 1}],
    [{"_target_": "Rotate90d", "keys": "image", "k": 1, "spatial_axes": [0, 2]}],
    [{"_target_": "SpatialCropd", "keys": "image", "roi_start": [1, 2, 0], "roi_end": [9, 10, 8]}],
    [{"_target_": "CenterSpatialCropd", "keys": "image", "roi_size": [8, 9, 10]}],
    [{"_target_": "SpatialPadd", "keys": "image", "spatial_size": [14, 13, 16]}],
    [{"_target_": "DivisiblePadd", "keys": "image", "k": 8}],
], ids=["orientation_spacing", "flip", "rotate90", "crop", "centre_crop", "pad", "divisible_pad"])
def test_way_back_is_the_exact_transpose_of_monais_spatial_transforms(tmp_path, case, extra):
    image, geometry, _ = case
    pipeline = open_bundle_quiet(_make_bundle(tmp_path / "bundle", _config(preprocessing={
        "_target_": "Compose", "transforms": [*PREPROCESSING[:4], *extra]})))
    prepared = pipeline.prepare(image, geometry)
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(geometry.direction, (3, 3)) * np.asarray(geometry.spacing)
    affine[:3, 3] = geometry.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's LPS to MONAI's RAS, on the (x, y, z) array
    leaf = torch.zeros((2, *image.shape[:0:-1]), dtype=torch.float64, requires_grad=True)
    moved = {"image": MetaTensor(leaf, affine=torch.as_tensor(affine))}
    for transform in pipeline.transforms[2:]:
        moved = transform(moved)
    maps = np.random.default_rng(1).normal(size=prepared.input.shape)
    (reference,) = torch.autograd.grad(moved["image"].as_tensor(), leaf, torch.as_tensor(maps))
    back, reference = prepared.maps_to_original(maps), reference.numpy().transpose(0, 3, 2, 1)
    print(f"\n{extra[0]['_target_'] if extra else 'Orientationd + Spacingd'}: way back vs autograd through MONAI "
          f"{np.abs(back - reference).max():.2g}; totals {maps.sum():.15g} and {back.sum():.15g}")
    assert len(prepared.record["spatial_steps"]) == 2 + len(extra)
    np.testing.assert_allclose(back, reference, atol=1e-6)  # Spacingd returns float32 even for float64 input
    if not any("Pad" in t["_target_"] for t in extra):  # relevance of padded voxels has no image voxel to go to
        assert abs(back.sum() - maps.sum()) < 1e-10


def test_a_box_drawn_on_the_images_lands_where_monai_moves_a_label_of_it(bundle, case, tmp_path):
    image, geometry, _ = case
    pipeline = open_bundle_quiet(bundle)
    prepared = pipeline.prepare(image, geometry)
    box = np.zeros(geometry.shape, bool)
    box[1:4, 3:9, 5:12] = True  # slices 1-3, rows 3-8, columns 5-11 of the oblique grid
    loading, spatial = _split(pipeline)
    label = _monai_read([_write(box.astype(np.float32), geometry, tmp_path / "box.nii.gz")], [*loading, *spatial])
    expected = label[0][0].numpy() >= 0.5  # Spacingd's bilinear share of the box, as region_to_network counts it
    mapped = prepared.region_to_network(box)
    print(f"\nbox of {box.sum()} voxels -> {mapped.sum()} network voxels; MONAI's label: {expected.sum()}")
    assert mapped.shape == prepared.input.shape[1:]
    np.testing.assert_array_equal(mapped, expected)
    click = np.zeros(geometry.shape, bool)
    click[3, 7, 8] = True
    assert prepared.region_to_network(click).sum() >= 1  # a click never vanishes


def test_torchscript_bundle_explains_with_gradients_and_refuses_lrp(bundle, case, tmp_path):
    image, geometry, _ = case
    scripted = tmp_path / "tiny_prostate_ts"
    shutil.copytree(bundle, scripted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_bundle.ckpt_export(net_id="network_def", filepath=str(scripted / "models" / "model.ts"),
                                 ckpt_file=str(scripted / "models" / "model.pt"),
                                 meta_file=str(scripted / "configs" / "metadata.json"),
                                 config_file=str(scripted / "configs" / "inference.json"), bundle_root=str(scripted))
    (scripted / "models" / "model.pt").unlink()
    pipeline = open_bundle_quiet(scripted, trust_code=True)  # TorchScript is code (test_bundle_safety)
    assert pipeline.scripted and pipeline.describe()["weights"] == "models/model.ts"
    assert pipeline.describe()["trusted_code"] == ["models/model.ts: TorchScript"]
    target = PredictedRegion(class_index=1)
    options = {"device": "cpu", "dtype": torch.float64}
    gradient = explain_case(pipeline, image, geometry, target, "gradient", **options)
    python = explain_case(open_bundle_quiet(bundle), image, geometry, target, "gradient", **options)
    np.testing.assert_allclose(gradient.maps, python.maps, rtol=1e-6, atol=1e-12)
    integrated = explain_case(pipeline, image, geometry, target, "integrated_gradients", n_steps=4, **options)
    assert integrated.maps.shape == image.shape
    network_total = integrated.expected_sum + integrated.delta  # the total comes back whole through the way back
    assert abs(integrated.maps.sum() - network_total) <= 1e-9 * max(1.0, abs(network_total))
    with pytest.raises(SegExplainError, match=r"tiny_prostate_ts.*TorchScript.*'lrp'.*integrated_gradients"):
        explain_case(pipeline, image, geometry, target, "lrp", **options)


def _config(**changes):
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        config[key] = value
    return config


@pytest.mark.parametrize(("changes", "key", "what"), [
    ({"preprocessing": {"_target_": "Compose", "transforms": [
        *PREPROCESSING, {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x * 2"}]}},
     "preprocessing::transforms::6::func", "'lambda x: x * 2' in the expression '$lambda x: x * 2'"),
    ({"pixdim": "$eval('[1.5] * 3')"}, "pixdim", "'eval' in the expression"),  # reached through @pixdim
    ({"network_def": {**NETWORK, "_target_": "segexplain_never_imported.Net"}}, "network_def::_target_",
     "'segexplain_never_imported.Net', which is not one of the MONAI network, transform and inferer classes"),
    ({"preprocessing": {"_target_": "Compose", "transforms": [*PREPROCESSING, {"_target_": "download", "name": "x"}]}},
     "preprocessing::transforms::6::_target_", "'download', which is not one of"),
    # a bare name that MONAI's own locator finds among its functions (this one downloads bundles)
])
def test_trust_rule_refuses_code_naming_the_key(tmp_path, changes, key, what):
    folder = _make_bundle(tmp_path / "bundle", _config(**changes))
    with pytest.raises(SegExplainError) as raised:
        open_bundle_quiet(folder)
    message = str(raised.value)
    assert f"(configs/inference.json): {key} names {what}" in message and "--trust-model-code" in message
    assert "segexplain_never_imported" not in sys.modules  # refused before anything was imported or built


@pytest.mark.parametrize("inferer", ["scripts.inferer.Vista3dInferer", "SliceInferer"])  # SliceInferer: 2D slices
def test_an_inferer_of_the_bundles_own_code_is_not_supported_even_trusted(tmp_path, inferer):
    folder = _make_bundle(tmp_path / "bundle", _config(inferer={"_target_": inferer, "roi_size": [8, 8]}))
    for trust_code in (False, True):
        with pytest.raises(SegExplainError, match=rf"the inferer '{inferer}' is not supported; expected "
                                                  r"monai.inferers' SimpleInferer, SlidingWindowInferer or "
                                                  r"SlidingWindowInfererAdapt"):
            open_bundle_quiet(folder, trust_code=trust_code)


def test_trusted_code_runs_and_is_recorded(tmp_path, case):
    image, geometry, _ = case
    scaled = {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x * 2"}
    folder = _make_bundle(tmp_path / "bundle", _config(preprocessing={"_target_": "Compose", "transforms": [
        *PREPROCESSING[:4], scaled]}))
    pipeline = open_bundle_quiet(folder, trust_code=True)
    assert pipeline.describe()["trusted_code"] == ["preprocessing::transforms::4::func: 'lambda x: x * 2' in the "
                                                   "expression '$lambda x: x * 2'"]
    plain = open_bundle_quiet(_make_bundle(tmp_path / "plain", _config(preprocessing={
        "_target_": "Compose", "transforms": PREPROCESSING[:4]})))
    np.testing.assert_allclose(pipeline.prepare(image, geometry).input, 2 * plain.prepare(image, geometry).input)


@pytest.mark.parametrize(("last", "name"), [
    ({**PREPROCESSING[3], "mode": "nearest"}, "Spacingd"),
    ({"_target_": "Resized", "keys": "image", "spatial_size": [10, 10, 10]}, "Resized"),  # area mode
    ({"_target_": "SpatialPadd", "keys": "image", "spatial_size": [14, 14, 14], "mode": "edge"}, "SpatialPadd"),
])
def test_a_transform_that_cannot_be_inverted_exactly_is_named(tmp_path, case, last, name):
    pipeline = open_bundle_quiet(_make_bundle(tmp_path / "bundle", _config(preprocessing={
        "_target_": "Compose", "transforms": [*PREPROCESSING[:3], last]})))
    with pytest.raises(SegExplainError, match=f"the bundle's {name} moves voxels in a way SegExplain cannot"):
        pipeline.prepare(*case[:2])


def test_bad_folders_say_which_path_and_what_was_expected(tmp_path, bundle):
    with pytest.raises(SegExplainError, match=r"'[^']*missing' is not a folder; expected a MONAI bundle folder"):
        open_bundle_quiet(tmp_path / "missing")
    no_config = tmp_path / "no_config"
    shutil.copytree(bundle, no_config)
    (no_config / "configs" / "inference.json").unlink()
    with pytest.raises(SegExplainError, match=r"no_config' has no configs/inference.json \(nor .yaml\)"):
        open_bundle_quiet(no_config)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(bundle, no_weights)
    (no_weights / "models" / "model.pt").unlink()
    with pytest.raises(SegExplainError, match=r"no_weights' has no weights: expected models/model.pt .* or "
                                              r"models/model.ts"):
        open_bundle_quiet(no_weights)
    wrong = _make_bundle(tmp_path / "wrong", _config(network_def={**NETWORK, "channels": [4, 16]}))
    with pytest.raises(SegExplainError, match=r"weights file '.*wrong/models/model.pt' does not match UNet"):
        open_bundle_quiet(wrong)
    with pytest.raises(SegExplainError, match="trust_code must be True or False, got 'yes'"):
        open_bundle_quiet(bundle, trust_code="yes")


def test_monai_checkpoint_with_a_model_key_loads(tmp_path, bundle):
    wrapped = tmp_path / "wrapped"
    shutil.copytree(bundle, wrapped)
    state = torch.load(wrapped / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "epoch": 3}, wrapped / "models" / "model.pt")
    reference = open_bundle_quiet(bundle).network.state_dict()
    loaded = open_bundle_quiet(wrapped).network.state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


def test_command_line_explains_a_bundle_onto_the_input_grid(bundle, case, tmp_path, capsys):
    from SegExplainLib.frontends.cli import main

    image, geometry, files = case
    output = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's notices about its own defaults
        code = main(["explain", "--bundle", str(bundle), "--input", *map(str, files), "--voxel", "3", "7", "8",
                     "--radius", "1", "--output", str(output), "--no-figures"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sequence_names"] == ["T2", "ADC"] and summary["model"]["kind"] == "bundle"
    maps, written = read_sequences([output / name for name in summary["files"][:2]])
    assert maps.shape == image.shape and written.differences(geometry) == []
    assert maps.sum() == pytest.approx(summary["expected_sum"] + summary["delta"], rel=1e-4)


def test_command_line_shows_library_warnings_only_with_verbose(bundle, case, tmp_path, capsys):
    """MONAI's notices (the bundle's Orientationd warns about its labels default) stay off stderr without --verbose."""
    from SegExplainLib.frontends.cli import main

    def show(message, category, filename, lineno, file=None, line=None):  # as a terminal shows them, not pytest
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    errors = {}
    for verbose in ([], ["--verbose"]):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            code = main(["explain", "--bundle", str(bundle), "--input", *map(str, case[2]), "--voxel", "3", "7", "8",
                         "--method", "gradient", "--output", str(tmp_path / f"out{len(verbose)}"), "--no-figures",
                         *verbose])
        errors[bool(verbose)] = capsys.readouterr().err
        assert code == 0, errors[bool(verbose)]
    assert errors[False] == ""
    assert "FutureWarning" in errors[True] and "Orientationd" in errors[True]


def test_sequence_names_are_read_from_the_metadata_alone(bundle, tmp_path, monkeypatch):
    """What a front end matches volumes with: the metadata's channel_def, without building the bundle; a bundle whose
    metadata lacks them is opened, and its names are the pipeline's."""
    assert open_bundle_quiet(bundle).sequences == ["T2", "ADC"]
    with monkeypatch.context() as patched:
        patched.setattr(pipelines, "open_pipeline", lambda *a, **k: pytest.fail("the bundle was built"))
        assert sequence_names("bundle", bundle) == ["T2", "ADC"]
    bare = shutil.copytree(bundle, tmp_path / "bare")
    (bare / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "name": "bare"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sequence_names("bundle", bare) == open_bundle_quiet(bare).sequences == ["channel0", "channel1"]
    with pytest.raises(SegExplainError, match="MONAI bundle '.*missing' is not a folder"):
        sequence_names("bundle", tmp_path / "missing")
