"""A bundle's sliding window is its inferer's own: the explained logits equal MONAI's ``SlidingWindowInferer``.

The bundles are real model-zoo configurations (``data/model_zoo``, see its README): spleen CT (UNet, blending
``constant``, ``sw_batch_size`` 4, overlap 0.5), whole-body CT (SegResNet, 105 classes, ``gaussian``, ``replicate``
padding, overlap 0.25) and BTCV (SwinUNETR, ``constant``, ``sw_batch_size`` 4). Their weights are random, written
from the state dict of the network MONAI builds from the bundle's own ``network_def``. Changed in the copies, for
speed on 2 CPU cores only: ``roi_size`` 96^3 -> 32^3 (64 x 32 x 32 and ``feature_size`` 48 -> 12 for SwinUNETR; the
window logic does not depend on the size); and BTCV's ``img_size``, which MONAI 1.5 removed from SwinUNETR (the
unchanged configuration is refused, naming it).

Each case is preprocessed by SegExplain (``prepare``); the reference is the bundle's ``inferer`` built by MONAI's
own ``ConfigParser`` and run on that same preprocessed input. One scan is shorter than the window on two axes
(MONAI pads them) and longer on the third, one longer on one axis and as long on the others.

Measured (torch 2.13 CPU, monai 1.6.1, 2-core CPU, shared; ``pytest -s`` prints them): the explained logits equal
MONAI's bit for bit (largest difference 0) on all six. Before this fix the three short scans crashed (a 21-voxel
window the networks cannot take) and the long ones differed by up to 0.28 (spleen), 1.2 (BTCV) and 0.0079 (whole
body: SegExplain's Gaussian instead of MONAI's importance map), on logits up to 0.8 to 4. The file runs in 20 to
30 s.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from SegExplainLib.engine.targets import BoxTarget
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import Geometry
from SegExplainLib.models.pipelines import explain_case, open_pipeline

monai_bundle = pytest.importorskip("monai.bundle")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

ZOO = Path(__file__).parent / "data" / "model_zoo"
#: Per bundle: the spacing its preprocessing resamples to (so that the network grid is the case's own grid), the
#: window (roi_size) and network_def changes of the copy. SwinUNETR needs 64 on some axis (its 32x downsampled
#: bottleneck has an instance norm, which needs more than one voxel).
BUNDLES = {"spleen_ct_segmentation": ((1.5, 1.5, 2.0), (32, 32, 32), {}),
           "wholeBody_ct_segmentation": ((1.5, 1.5, 1.5), (32, 32, 32), {}),
           "swin_unetr_btcv_segmentation": ((1.5, 1.5, 2.0), (64, 32, 32), {"feature_size": 12})}
#: Network grids (x, y, z) as offsets from the window: shorter on y and z, longer on x; longer on x, as long on y
#: and z (MONAI's scan interval is then the whole window).
SHORT, LONG = (4, -5, -11), (12, 0, 0)


def _zoo_bundle(folder: Path, name: str, *, shrink: bool = True) -> Path:
    """The zoo bundle ``name`` (its configs) with random weights made by its own network_def."""
    shutil.copytree(ZOO / name, folder)
    config_file = folder / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    if shrink:
        config["inferer"]["roi_size"] = list(BUNDLES[name][1])
        config["network_def"].update(BUNDLES[name][2])
        config["network_def"].pop("img_size", None)  # removed from SwinUNETR in MONAI 1.5
        config_file.write_text(json.dumps(config))
    network_def = {k: v for k, v in config["network_def"].items() if k != "img_size"}
    torch.manual_seed(0)
    network = monai_bundle.ConfigParser({"network_def": network_def}).get_parsed_content("network_def")
    (folder / "models").mkdir()
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def _monai_inferer(folder: Path):
    """The bundle's inferer as MONAI builds it from the configuration."""
    parser = monai_bundle.ConfigParser()
    parser.read_config(folder / "configs" / "inference.json")
    parser["bundle_root"] = str(folder)
    return parser.get_parsed_content("inferer")


def _case(name: str, offsets: tuple[int, int, int]):
    """A CT-like case whose network grid (x, y, z) is the window plus ``offsets``: RAS-aligned at the bundle's own
    spacing."""
    spacing, roi, _ = BUNDLES[name]
    size = tuple(r + o for r, o in zip(roi, offsets))
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), size)
    image = np.random.default_rng(0).normal(40.0, 120.0, size=(1, *geometry.shape)).astype(np.float32)
    return image, geometry


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request, tmp_path_factory):
    return request.param, _zoo_bundle(tmp_path_factory.mktemp("zoo") / request.param, request.param)


@pytest.mark.parametrize("offsets", [SHORT, LONG], ids=["shorter", "longer"])
def test_explained_logits_are_the_bundles_inferer_run_by_monai(bundle, offsets):
    name, folder = bundle
    grid = tuple(r + o for r, o in zip(BUNDLES[name][1], offsets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = open_pipeline("bundle", folder)
    prepared = pipeline.prepare(*_case(name, offsets))
    assert prepared.input.shape[1:] == grid
    inputs = torch.from_numpy(prepared.input)[None]
    started = time.perf_counter()
    with torch.no_grad():
        explained = prepared.model(inputs)
        reference = _monai_inferer(folder)(inputs, pipeline.network)
    difference = float((explained - reference).abs().max())
    print(f"\n{name} {grid}: max |logits - MONAI's| {difference:.2g} (logits up to "
          f"{float(reference.abs().max()):.2g}); {time.perf_counter() - started:.1f} s for both")
    assert explained.shape == reference.shape == (1, len(pipeline.classes), *grid)
    torch.testing.assert_close(explained, reference, rtol=1e-5, atol=1e-5)
    inferer = json.loads((folder / "configs" / "inference.json").read_text())["inferer"]
    record = prepared.record
    assert record["blending"] == inferer.get("mode", "constant")
    assert record["sw_batch_size"] == (1 if name.startswith("wholeBody") else inferer["sw_batch_size"])
    padded = record["window_padding"]
    if offsets == LONG:
        assert padded is None
    else:  # MONAI's split: half the difference, rounded down, before
        assert (padded["before"], padded["after"]) == ([0, 2, 5], [0, 3, 6])
        assert padded["mode"] == inferer.get("padding_mode", "constant")


def test_a_scan_shorter_than_the_window_is_explained_on_its_own_grid(tmp_path):
    name = "spleen_ct_segmentation"
    pipeline = open_pipeline("bundle", _zoo_bundle(tmp_path / name, name))
    image, geometry = _case(name, SHORT)
    result = explain_case(pipeline, image, geometry, BoxTarget((8, 10, 14), (12, 16, 20), class_index=1), "gradient",
                          device="cpu")
    assert result.maps.shape == image.shape
    assert result.extras["pipeline"]["window_padding"] == {"before": [0, 2, 5], "after": [0, 3, 6],
                                                            "mode": "constant", "value": 0.0}


def test_a_bundle_for_another_monai_version_names_the_argument(tmp_path):
    import monai

    folder = _zoo_bundle(tmp_path / "btcv", "swin_unetr_btcv_segmentation", shrink=False)
    with pytest.raises(SegExplainError) as raised:
        open_pipeline("bundle", folder)
    assert str(raised.value).endswith(
        "(configs/inference.json): network_def gives SwinUNETR the argument 'img_size', which SwinUNETR of the "
        f"installed MONAI {monai.__version__} does not take; the bundle needs MONAI 1.4.0 (its metadata's "
        "monai_version): open it where that version is installed")
    assert "\n" not in str(raised.value)
