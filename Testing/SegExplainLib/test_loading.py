"""Tests of model loading: spec forms, weights round trips, pickles, model cards and intensity normalization."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.loading import ModelCard, load_model, load_weights, normalize, untrusted_code
from SegExplainLib.models.networks import UNet3D, tiny_unet

MODEL_FILE = """
import torch
from torch import nn


class TwoConv(nn.Module):
    def __init__(self, in_channels=2, out_channels=3):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


def make(width=3):
    return TwoConv(out_channels=width)


def not_a_model():
    return 42


def broken():
    raise RuntimeError("factory exploded\\nsecond line")


CONSTANT = 7
"""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my net.py"
    path.write_text(MODEL_FILE)
    return path


def _x(in_channels: int = 2) -> torch.Tensor:
    return torch.randn(1, in_channels, 4, 4, 4)


def _trained_tiny() -> UNet3D:
    """A tiny U-Net with non-default BatchNorm statistics, in eval mode."""
    model = tiny_unet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ spec forms


@pytest.mark.parametrize("spec", ["reference", "reference_unet", "unet3d"])
def test_builtin_specs(spec):
    model = load_model(spec, kwargs={"in_channels": 3, "out_channels": 4, "base_channels": 2, "depth": 2})
    assert isinstance(model, UNet3D) and not model.training
    assert model.config()["in_channels"] == 3 and model.config()["out_channels"] == 4
    assert model(_x(3)).shape == (1, 4, 4, 4, 4)


def test_reference_defaults_are_the_papers_network():
    assert load_model("reference").config() == UNet3D().config()


def test_file_spec_class_and_factory(model_file):
    model = load_model(f"{model_file}:TwoConv", kwargs={"out_channels": 5}, trust_code=True)
    assert type(model).__name__ == "TwoConv" and not model.training
    assert model(_x()).shape == (1, 5, 4, 4, 4)
    assert load_model(f"{model_file}:make", kwargs={"width": 2}, trust_code=True)(_x()).shape == (1, 2, 4, 4, 4)
    # Each import gets its own unique module, registered in sys.modules.
    first, second = (load_model(f"{model_file}:TwoConv", trust_code=True) for _ in range(2))
    assert type(first).__module__ != type(second).__module__
    assert type(first).__module__ in sys.modules


def test_package_module_spec():
    model = load_model("SegExplainLib.models:tiny_unet", kwargs={"out_channels": 3})
    assert isinstance(model, UNet3D) and model.out_channels == 3 and not model.training


def test_monai_spec_with_kwargs():
    pytest.importorskip("monai")
    model = load_model(
        "monai:UNet",
        kwargs={"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": (4, 8), "strides": (2,)},
    )
    assert type(model).__name__ == "UNet" and not model.training
    assert model(torch.randn(1, 2, 8, 8, 8)).shape == (1, 3, 8, 8, 8)


def test_torch_nn_spec():
    model = load_model("torch.nn:Conv3d", kwargs={"in_channels": 2, "out_channels": 3, "kernel_size": 1})
    assert isinstance(model, nn.Conv3d) and model(_x()).shape == (1, 3, 4, 4, 4)


def test_monai_missing_names_the_package(monkeypatch):
    for name in ("monai", "monai.networks", "monai.networks.nets"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SegExplainError, match=r"'monai:UNet' needs the package monai, which is not installed"):
        load_model("monai:UNet")


# ------------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    original = _trained_tiny()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(original.state_dict(), str(path))
    else:
        torch.save(original.state_dict(), path)
    loaded = load_model("SegExplainLib.models:tiny_unet", weights=str(path))
    assert not loaded.training
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)
        # A freshly built model differs, so the comparison above is not vacuous.
        assert not torch.equal(tiny_unet().eval()(x), original(x))


def test_weights_checkpoint_wrappers(tmp_path):
    original = _trained_tiny()
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, wrapped)
    parallel = tmp_path / "parallel.pt"
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, parallel)
    x = _x()
    with torch.no_grad():
        for path in (wrapped, parallel):
            torch.testing.assert_close(load_model("unet3d", kwargs=tiny_unet().config(), weights=path)(x), original(x))


def test_load_weights_returns_the_model(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_trained_tiny().state_dict(), path)
    model = tiny_unet()
    assert load_weights(model, path) is model


def test_weights_mismatch_names_keys(tmp_path):
    state = tiny_unet().state_dict()
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(SegExplainError, match=r"bad\.pt.*missing keys head\.weight; unexpected keys extra\.weight"):
        load_model("SegExplainLib.models:tiny_unet", weights=path)


def test_weights_shape_mismatch(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(tiny_unet(out_channels=3).state_dict(), str(path))
    with pytest.raises(SegExplainError, match=r"shape mismatch head\.weight \(3, 4, 1, 1, 1\) in file vs \(2, 4, 1, 1, 1\)"):
        load_model("SegExplainLib.models:tiny_unet", weights=path)


def test_many_missing_keys_are_abbreviated(tmp_path):
    path = tmp_path / "empty_ish.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(SegExplainError, match=r"missing keys .*\(\+\d+ more\); unexpected keys x$"):
        load_model("SegExplainLib.models:tiny_unet", weights=path)


def test_weights_errors(tmp_path):
    with pytest.raises(SegExplainError, match=r"weights file .*nothere\.pt' does not exist"):
        load_model("unet3d", kwargs=tiny_unet().config(), weights=tmp_path / "nothere.pt")
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(SegExplainError, match=r"w\.ckpt' has extension '\.ckpt'; expected one of \.pt, \.pth"):
        load_model("unet3d", weights=ckpt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SegExplainError, match=r"reading safetensors file .*junk\.safetensors' failed"):
        load_model("SegExplainLib.models:tiny_unet", weights=junk)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(SegExplainError, match=r"list\.pt' holds a list that is not a state dict"):
        load_model("SegExplainLib.models:tiny_unet", weights=listed)
    with pytest.raises(SegExplainError, match=r"weights must be a path to a \.pt, \.pth, \.safetensors file, got 3"):
        load_model("unet3d", weights=3)


def test_whole_model_as_weights_points_to_pickle(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_unet(), path)
    with pytest.raises(SegExplainError, match=r"not a plain state dict .*use --model pickle:.*whole\.pt with "
                                              r"--trust-model-code"):
        load_model("SegExplainLib.models:tiny_unet", weights=path)


# ------------------------------------------------------------------------------------------------------ pickles


def test_pickle_needs_trust(tmp_path):
    original = _trained_tiny()
    path = tmp_path / "whole.pt"
    torch.save(original, path)
    with pytest.raises(SegExplainError, match=r"would run code stored in the pickle .*whole\.pt'.*trust_code=True"):
        load_model(f"pickle:{path}")
    loaded = load_model(f"pickle:{path}", trust_code=True)
    assert isinstance(loaded, UNet3D) and not loaded.training
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


def test_pickle_errors(tmp_path):
    with pytest.raises(SegExplainError, match=r"pickled model file .*gone\.pt' of spec .* does not exist"):
        load_model(f"pickle:{tmp_path / 'gone.pt'}", trust_code=True)
    state = tmp_path / "state.pt"
    torch.save(tiny_unet().state_dict(), state)
    with pytest.raises(SegExplainError, match=r"state\.pt' holds a OrderedDict, expected a whole torch\.nn\.Module"):
        load_model(f"pickle:{state}", trust_code=True)
    with pytest.raises(SegExplainError, match=r"loads a whole model and takes no kwargs, got \{'depth': 2\}"):
        load_model(f"pickle:{state}", kwargs={"depth": 2}, trust_code=True)
    with pytest.raises(SegExplainError, match=r"model spec 'pickle:' names no file; expected pickle:PATH"):
        load_model("pickle:", trust_code=True)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    with pytest.raises(SegExplainError, match=r"unpickling model file .*garbage\.pt' failed"):
        load_model(f"pickle:{garbage}", trust_code=True)


# ------------------------------------------------------------------------------------------------------ trust


SENTINEL_FILE = """
from pathlib import Path

Path(__file__).with_name("ran.txt").write_text("the model file ran")

from torch import nn


class Net(nn.Conv3d):
    def __init__(self):
        super().__init__(2, 2, kernel_size=1)
"""


@pytest.mark.parametrize("spec", [
    "{folder}/evil.py:Net",
    "os:system",
    "pickle:{folder}/whole.pt",
    "SegExplainLib.models:torch.hub.load",  # a dotted name reaches beyond the allow-listed module
    "monai:torch.load",
])
def test_specs_that_run_code_are_refused_before_importing_anything(tmp_path, spec):
    (tmp_path / "evil.py").write_text(SENTINEL_FILE)
    torch.save(tiny_unet(), tmp_path / "whole.pt")
    spec = spec.format(folder=tmp_path)
    touched = tmp_path / "touched"
    kwargs = {"command": f"touch {touched}"} if spec == "os:system" else None
    with pytest.raises(SegExplainError, match=r"would run .*; pass trust_code=True only if you trust it"):
        load_model(spec, kwargs=kwargs)
    assert not (tmp_path / "ran.txt").exists() and not touched.exists()
    assert untrusted_code(spec) is not None


def test_trusted_file_spec_runs_the_file(tmp_path):
    (tmp_path / "evil.py").write_text(SENTINEL_FILE)
    model = load_model(f"{tmp_path / 'evil.py'}:Net", trust_code=True)
    assert isinstance(model, nn.Conv3d) and (tmp_path / "ran.txt").read_text() == "the model file ran"


@pytest.mark.parametrize("spec", ["reference", "reference_unet", "unet3d", "UNet3D", "SegExplainLib.models:tiny_unet",
                                  "SegExplainLib.models:UNet3D", "monai:UNet", "torch.nn:Conv3d"])
def test_built_in_and_library_networks_need_no_trust(spec):
    assert untrusted_code(spec) is None


@pytest.mark.parametrize(("spec", "code"), [
    ("nets/unet.py:Net", r"the Python file 'nets/unet\.py'"),
    ("os:system", r"code from the module 'os'"),
    ("monai:networks.nets.UNet", r"code reached through 'networks\.nets\.UNet' of monai\.networks\.nets"),
    ("pickle:whole.pt", r"code stored in the pickle 'whole\.pt'"),
])
def test_untrusted_code_says_what_would_run(spec, code):
    assert re.fullmatch(code, untrusted_code(spec))


def test_untrusted_code_checks_the_spec():
    with pytest.raises(SegExplainError, match=r"model spec 'resnet' matches none of the forms"):
        untrusted_code("resnet")


def test_allow_listed_module_builds_only_networks():
    """Without trust, an allow-listed module gives its network classes and factories, nothing else it imported."""
    with pytest.raises(SegExplainError, match=r"'SegExplainLib\.models:check_choice' names a function of "
                                              r"SegExplainLib\.engine\.checks, expected a network"):
        load_model("SegExplainLib.models:check_choice", kwargs={"value": "a", "name": "b", "choices": ["a"]})


def test_a_monai_network_that_looks_names_up_elsewhere_needs_the_flag(monkeypatch):
    """MONAI's TorchVisionFCModel looks its model_name up in torchvision: a card's string would choose what runs, so
    it needs the flag like a bundle's; with the flag the name reaches the network (positive control)."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    called = []

    class TorchVisionFCModel(nn.Identity):  # stands in for MONAI's, which needs torchvision
        def __init__(self, **kwargs):
            super().__init__()
            called.append(kwargs)

    monkeypatch.setattr(monai_nets, "TorchVisionFCModel", TorchVisionFCModel)
    with pytest.raises(SegExplainError, match=r"'monai:TorchVisionFCModel' names TorchVisionFCModel, which looks "
                                              r"names up in another library by itself; pass --trust-model-code"):
        load_model("monai:TorchVisionFCModel", kwargs={"model_name": "os.system"})
    assert not called
    assert isinstance(load_model("monai:TorchVisionFCModel", kwargs={"model_name": "x"}, trust_code=True), nn.Identity)
    assert called == [{"model_name": "x"}]


@pytest.mark.parametrize("spec", ["resnet", "model.pt", "a b:c", "x.py:", "mod:1name", ":Name"])
def test_spec_matching_nothing(spec):
    with pytest.raises(SegExplainError, match=rf"model spec '{spec}' matches none of the forms reference, "):
        load_model(spec)


def test_spec_errors(tmp_path, model_file):
    with pytest.raises(SegExplainError, match=r"model spec must be a non-empty string, got ''"):
        load_model("")
    with pytest.raises(SegExplainError, match=r"model spec must be a non-empty string, got None"):
        load_model(None)
    with pytest.raises(SegExplainError, match=r"model file .*absent\.py' of spec .* does not exist"):
        load_model(f"{tmp_path / 'absent.py'}:Net", trust_code=True)
    with pytest.raises(SegExplainError, match=r"my net\.py' has no attribute 'Missing'; expected a class or factory"):
        load_model(f"{model_file}:Missing", trust_code=True)
    with pytest.raises(SegExplainError, match=r"module 'SegExplainLib\.models' has no attribute 'nope'"):
        load_model("SegExplainLib.models:nope")
    with pytest.raises(SegExplainError, match=r"module 'no_such_package_xyz' not found"):
        load_model("no_such_package_xyz.models:Net", trust_code=True)
    pytest.importorskip("monai")
    with pytest.raises(SegExplainError, match=r"monai\.networks\.nets has no attribute 'NoSuchNet'"):
        load_model("monai:NoSuchNet")


def test_factory_errors(model_file):
    with pytest.raises(SegExplainError, match=r":not_a_model' returned a int, expected a torch\.nn\.Module"):
        load_model(f"{model_file}:not_a_model", trust_code=True)
    with pytest.raises(SegExplainError, match=r":CONSTANT' names a int, expected a class or factory"):
        load_model(f"{model_file}:CONSTANT", trust_code=True)
    with pytest.raises(SegExplainError, match=r"building model .*:broken' with kwargs \{\} failed: RuntimeError: factory exploded$"):
        load_model(f"{model_file}:broken", trust_code=True)
    with pytest.raises(SegExplainError, match=r"building model 'unet3d' with kwargs \{'width': 3\} failed: TypeError"):
        load_model("unet3d", kwargs={"width": 3})
    with pytest.raises(SegExplainError, match=r"unknown UNet3D option\(s\) width"):
        load_model("reference", kwargs={"width": 3})


def test_broken_model_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_module_abc\n")
    with pytest.raises(SegExplainError, match=r"importing model file .*broken\.py' failed: ModuleNotFoundError"):
        load_model(f"{path}:Net", trust_code=True)
    assert not any(name.endswith("_broken") for name in sys.modules if name.startswith("_segexplain_model_"))


def test_option_errors():
    with pytest.raises(SegExplainError, match=r"kwargs must be a mapping of option names to values, got \[1\]"):
        load_model("unet3d", kwargs=[1])
    with pytest.raises(SegExplainError, match=r"trust_code must be True or False, got 'yes'"):
        load_model("unet3d", trust_code="yes")


def test_every_message_is_one_line(tmp_path, model_file):
    with pytest.raises(SegExplainError) as info:
        load_model(f"{model_file}:broken", trust_code=True)
    assert "\n" not in str(info.value)
    path = tmp_path / "whole.pt"
    torch.save(tiny_unet(), path)
    with pytest.raises(SegExplainError) as info:
        load_model("SegExplainLib.models:tiny_unet", weights=path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------------ normalization


def test_normalization_formulas(rng):
    image = rng.normal(3.0, 2.0, size=(4, 3, 5, 6)).astype(np.float32)
    specs = [
        {"kind": "zscore"},
        {"kind": "percentile", "low": 5, "high": 90},
        {"kind": "window", "low": 2.0, "high": 4.0},
        {"kind": "none"},
    ]
    out = normalize(image, specs)
    assert out.dtype == np.float32 and out.shape == image.shape
    x = image.astype(np.float64)
    np.testing.assert_allclose(out[0], (x[0] - x[0].mean()) / x[0].std(), rtol=1e-5, atol=1e-6)
    lo, hi = np.percentile(x[1], 5), np.percentile(x[1], 90)
    np.testing.assert_allclose(out[1], (np.clip(x[1], lo, hi) - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], (np.clip(x[2], 2.0, 4.0) - 2.0) / 2.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[3], image[3])
    assert out[1].min() == 0.0 and out[1].max() == 1.0 and out[2].min() == 0.0 and out[2].max() == 1.0


def test_one_spec_for_all_channels_and_defaults(rng):
    image = rng.integers(0, 1000, size=(2, 4, 4, 4)).astype(np.int16)
    out = normalize(image, {"kind": "percentile"})
    assert out.dtype == np.float32
    for c in range(2):
        x = image[c].astype(np.float64)
        lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
        np.testing.assert_allclose(out[c], (np.clip(x, lo, hi) - lo) / (hi - lo), rtol=1e-6)
    assert normalize(image.astype(np.float64), {"kind": "zscore"}).dtype == np.float64


def test_constant_channel_gives_zeros():
    image = np.full((3, 2, 2, 2), 5.0)
    for spec in ({"kind": "zscore"}, {"kind": "percentile"}):
        np.testing.assert_array_equal(normalize(image, spec), np.zeros_like(image))


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ({"kind": "gamma"}, r"normalization kind must be one of zscore, percentile, window, none, got 'gamma'"),
        ({"low": 1}, r"normalization must be a mapping with a 'kind'"),
        ({"kind": "zscore", "low": 1}, r"normalization of kind 'zscore' has unknown key\(s\) low; expected only kind"),
        ({"kind": "window", "low": 1}, r"normalization of kind 'window' needs both low and high"),
        ({"kind": "window", "low": 3, "high": 1}, r"window must satisfy low < high, got low=3\.0, high=1\.0"),
        ({"kind": "window", "low": "a", "high": 1}, r"normalization low must be a finite number, got 'a'"),
        ({"kind": "percentile", "high": 101}, r"percentiles must satisfy 0 <= low < high <= 100, got low=0\.5, high=101"),
        ({"kind": "percentile", "low": True}, r"normalization low must be a finite number, got True"),
        ([], r"normalization must be one spec or a non-empty list of per-channel specs, got \[\]"),
        ([{"kind": "none"}, {"kind": "x"}], r"normalization\[1\] kind must be one of"),
        ([{"kind": "none"}] * 3, r"normalization lists 3 specs but the image has 2 channels"),
    ],
)
def test_normalization_errors(specs, message):
    with pytest.raises(SegExplainError, match=message):
        normalize(np.zeros((2, 2, 2, 2)), specs)


def test_normalization_image_errors():
    with pytest.raises(SegExplainError, match=r"image must be a numpy array \(C, D, H, W\), got list"):
        normalize([1, 2], {"kind": "none"})
    with pytest.raises(SegExplainError, match=r"image must be a numpy array \(C, D, H, W\), got ndarray \(3,\)"):
        normalize(np.zeros(3), {"kind": "none"})
    with pytest.raises(SegExplainError, match=r"image must hold real numbers, got dtype bool"):
        normalize(np.zeros((1, 2), dtype=bool), {"kind": "none"})
    image = np.zeros((2, 2, 2, 2))
    image[1, 0, 0, 0] = np.nan
    with pytest.raises(SegExplainError, match=r"image channel 1 has NaN or infinite values"):
        normalize(image, {"kind": "zscore"})


# ------------------------------------------------------------------------------------------------------ model card


def _card_data() -> dict:
    return {
        "model": "SegExplainLib.models:tiny_unet",
        "kwargs": {"out_channels": 2},
        "weights": "weights/net.safetensors",
        "sequences": ["T2", "T1-20s"],
        "classes": ["background", "lesion"],
        "normalization": [{"kind": "zscore"}, {"kind": "window", "low": 0, "high": 100}],
        "patch_size": [16, 32, 32],
        "description": "a test card",
    }


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_card_read_and_load(tmp_path, suffix, rng):
    original = _trained_tiny()
    (tmp_path / "weights").mkdir()
    save_file(original.state_dict(), str(tmp_path / "weights" / "net.safetensors"))
    card_path = tmp_path / "cards" / f"prostate{suffix}"
    card_path.parent.mkdir()
    data = {**_card_data(), "weights": "../weights/net.safetensors"}
    card_path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))

    card = ModelCard.read(card_path)
    assert card.weights == (tmp_path / "weights" / "net.safetensors").resolve()
    assert card.name == "prostate" and card.sequences == ["T2", "T1-20s"] and card.patch_size == (16, 32, 32)
    assert card.normalization[1] == {"kind": "window", "low": 0.0, "high": 100.0}
    model = card.load_model()
    assert not model.training
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)

    image = rng.normal(50, 30, size=(2, 3, 4, 4))
    out = card.normalize(image)
    np.testing.assert_allclose(out[0], (image[0] - image[0].mean()) / image[0].std())
    np.testing.assert_allclose(out[1], np.clip(image[1], 0, 100) / 100)
    assert ModelCard.from_dict(card.to_dict()) == card
    json.dumps(card.to_dict())


def test_card_model_file_relative_to_card(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "net.py").write_text(MODEL_FILE)
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps({"model": "nets/net.py:make", "kwargs": {"width": 2}, "sequences": ["T2", "ADC"],
                                     "classes": ["bg", "lesion"], "normalization": {"kind": "zscore"}}))
    monkeypatch.chdir(tmp_path.parent)
    card = ModelCard.read(card_path)
    assert card.model == f"{tmp_path / 'nets' / 'net.py'}:make" and card.weights is None
    assert card.load_model(trust_code=True)(_x()).shape == (1, 2, 4, 4, 4)
    assert card.normalization == {"kind": "zscore"}


@pytest.mark.parametrize("model", ["pickle:whole.pt", "evil.py:Net", "os:system"])
def test_a_card_cannot_allow_its_own_code(tmp_path, model):
    """A card's trust_pickle (older cards have it) is ignored: only the caller's trust_code allows code to run."""
    torch.save(tiny_unet(), tmp_path / "whole.pt")
    (tmp_path / "evil.py").write_text(SENTINEL_FILE)
    touched = tmp_path / "touched"
    data = {"model": model, "sequences": ["T2", "T1"], "classes": ["bg", "fg"], "trust_pickle": True,
            **({"kwargs": {"command": f"touch {touched}"}} if model == "os:system" else {})}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(data))
    card = ModelCard.read(tmp_path / "card.yaml")
    with pytest.raises(SegExplainError, match=r"would run .*; pass trust_code=True only if you trust it"):
        card.load_model()
    assert not (tmp_path / "ran.txt").exists() and not touched.exists()
    assert "trust_pickle" not in card.to_dict()
    if model != "os:system":
        assert isinstance(card.load_model(trust_code=True), nn.Module)


def test_card_defaults_and_direct_construction():
    card = ModelCard(model="reference", sequences=("T2",), classes=["bg", "fg"], patch_size=[8, 8, 8])
    assert card.normalization == {"kind": "none"} and card.kwargs == {} and card.weights is None
    assert card.sequences == ["T2"] and card.patch_size == (8, 8, 8)
    with pytest.raises(SegExplainError, match=r"ModelCard: field 'classes' must be a non-empty list"):
        ModelCard(model="reference", sequences=["T2"], classes=[])


def test_card_channel_count_mismatch():
    card = ModelCard.from_dict({**_card_data(), "weights": None})
    with pytest.raises(SegExplainError, match=r"image has 3 channels but model card .* lists 2 sequences \(T2, T1-20s\)"):
        card.normalize(np.zeros((3, 2, 2, 2)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": 3}, r"field 'model' must be a non-empty model spec string, got 3"),
        ({"kwargs": [1]}, r"field 'kwargs' must be a mapping of option names to values"),
        ({"weights": 5}, r"field 'weights' must be a path string or null, got 5"),
        ({"sequences": "T2"}, r"field 'sequences' must be a non-empty list of non-empty strings, got 'T2'"),
        ({"sequences": ["T2", "T2"]}, r"field 'sequences' must not repeat names, got T2 more than once"),
        ({"classes": ["bg", ""]}, r"field 'classes' must be a non-empty list of non-empty strings"),
        ({"normalization": {"kind": "gamma"}}, r"field 'normalization' kind must be one of"),
        ({"normalization": [{"kind": "none"}] * 3}, r"field 'normalization' lists 3 specs for 2 sequences"),
        ({"patch_size": [16, 32]}, r"field 'patch_size' must be 3 ints >= 1 \(D, H, W\) or null, got \[16, 32\]"),
        ({"patch_size": [16, 0, 3]}, r"field 'patch_size' must be 3 ints >= 1"),
        ({"name": 1}, r"field 'name' must be a string, got 1"),
        ({"colour": "red"}, r"has unknown field\(s\) colour; expected any of model, kwargs"),
    ],
)
def test_card_field_errors_name_field_and_file(tmp_path, change, message):
    path = tmp_path / "card.json"
    path.write_text(json.dumps({**_card_data(), **change}))
    with pytest.raises(SegExplainError, match=r"model card '.*card\.json'.*" + message):
        ModelCard.read(path)


def test_card_file_errors(tmp_path):
    with pytest.raises(SegExplainError, match=r"model card .*none\.yaml' does not exist"):
        ModelCard.read(tmp_path / "none.yaml")
    txt = tmp_path / "card.txt"
    txt.write_text("{}")
    with pytest.raises(SegExplainError, match=r"card\.txt' has extension '\.txt'; expected one of \.yaml, \.yml, \.json"):
        ModelCard.read(txt)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SegExplainError, match=r"model card .*bad\.json' cannot be parsed: JSONDecodeError"):
        ModelCard.read(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    with pytest.raises(SegExplainError, match=r"model card .*bad\.yaml' cannot be parsed: \w+Error") as info:
        ModelCard.read(bad_yaml)
    assert "\n" not in str(info.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(SegExplainError, match=r"model card .*list\.yaml' must hold a mapping of fields, got list"):
        ModelCard.read(listed)
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"model": "reference"}))
    with pytest.raises(SegExplainError, match=r"missing\.yaml' lacks required field\(s\) sequences, classes"):
        ModelCard.read(missing)
