"""A MONAI bundle cannot run code without ``trust_code``: the issue's probes, TorchScript, and generated probes.

Each probe is shown live by a positive control: the same bundle does run its code with the flag (or, for a loader
SegExplain never builds, when MONAI itself builds it). The generator walks the attribute graph from torch, torch.nn,
monai, numpy and dynamic_network_architectures (``attribute_probes.callable_paths``) to callables outside the
allow-lists and writes every path into every name-taking field of a bundle configuration; each is refused naming the
key and the name, and passes the gate with the flag. The gate is run on the configuration alone, so no walked
callable is ever called. Measured (2-core CPU, shared; ``pytest -s`` prints them): 1 372 paths, 9 604 probes,
6 to 7 s.

``data/model_zoo/<bundle>/configs/inference.json`` are the inference configurations of five MONAI model-zoo bundles,
copied unchanged from github.com/Project-MONAI/model-zoo at dfae206d (Apache-2.0, see data/model_zoo/README.md): they
must pass without the flag.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from SegExplainLib.errors import SegExplainError

monai_bundle = pytest.importorskip("monai.bundle")
pytest.importorskip("nibabel")

from attribute_probes import DANGEROUS, callable_paths, reaches  # noqa: E402

from SegExplainLib.models import bundle_inferer, bundle_safety  # noqa: E402
from SegExplainLib.models import monai_bundle as bundles  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ZOO = sorted((Path(__file__).parent / "data" / "model_zoo").glob("*/configs/inference.json"))
NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
           "strides": [2]}
LOADING = [{"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader"},
           {"_target_": "EnsureChannelFirstd", "keys": "image"}]
CONFIG = {"network_def": NETWORK, "preprocessing": {"_target_": "Compose", "transforms": [
    *LOADING, {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]},
          "inferer": {"_target_": "SimpleInferer"}}
METADATA = {"version": "0.1.0", "name": "probe", "network_data_format": {
    "inputs": {"image": {"num_channels": 1}}, "outputs": {"pred": {"num_channels": 2}}}}


def _bundle(folder, config, network=None):
    from monai.networks.nets import UNet

    network = network or UNet(3, 1, 2, channels=(4, 8), strides=(2,))
    monai_bundle.init_bundle(folder, network=network, metadata_str=METADATA, inference_str=config)
    return folder


def _open(folder, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bundles.open_bundle(folder, **options)


def _gate(config, roots=("network_def", "preprocessing"), *, trusted=False):
    from monai.bundle import ConfigParser

    parser = ConfigParser(json.loads(json.dumps(config)))
    return parser, bundle_safety.refuse_untrusted_config(parser, list(roots), "probe", trusted=trusted)


@pytest.mark.parametrize("config_file", ZOO, ids=[p.parents[1].name for p in ZOO])
def test_model_zoo_configurations_pass_and_monai_gets_the_classes(config_file):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, MapTransform

    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"], parser["device"] = "zoo", "cpu"
    parser.resolve_macro_and_relative_ids()
    _, options = bundle_inferer.read_inferer(parser, "zoo")
    assert bundle_safety.refuse_untrusted_config(parser, ["network_def", "preprocessing", *options], "zoo",
                                           trusted=False) == []
    named = json.loads(config_file.read_text())["network_def"]["_target_"]
    assert parser["network_def"]["_target_"] is bundle_safety.allowed_targets().get(named) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocessing = parser.get_parsed_content("preprocessing")
    assert isinstance(preprocessing, Compose)
    loaders = [t.transform for t in preprocessing.transforms if isinstance(t, bundle_safety.SkippedLoader)]
    assert "LoadImaged" in loaders  # never built: BTCV's ITKReader needs itk, which is not installed here
    assert all(isinstance(t, (bundle_safety.SkippedLoader, MapTransform)) for t in preprocessing.transforms)


def test_probe_act_calling_a_shell_command_is_refused_and_runs_with_the_flag(tmp_path):
    marker = tmp_path / "MARKER"
    config = {**CONFIG, "network_def": {**NETWORK, "act": ["$torch.hub.os.system", {"command": f"touch {marker}"}]}}
    folder = _bundle(tmp_path / "bundle", config)
    with pytest.raises(SegExplainError, match=r"network_def::act names \['\$torch\.hub\.os\.system', .*which is not "
                                              r"one of the names of MONAI's activation layers .*--trust-model-code"):
        _open(folder)
    assert not marker.exists()
    with pytest.raises(SegExplainError, match="building network_def failed"):  # os.system returned an int, not a layer
        _open(folder, trust_code=True)
    assert marker.exists()  # positive control: the probe is live


def test_probe_reader_calling_a_shell_command_is_refused_and_never_built(tmp_path):
    from monai.bundle import ConfigParser

    marker = tmp_path / "MARKER"
    loader = {"_target_": "LoadImaged", "keys": "image", "reader": "os.system", "command": f"touch {marker}"}
    config = {**CONFIG, "preprocessing": {"_target_": "Compose", "transforms": [loader, LOADING[1]]}}
    folder = _bundle(tmp_path / "bundle", config)
    with pytest.raises(SegExplainError, match=r"preprocessing::transforms::0::reader names 'os\.system', which is "
                                              r"not one of MONAI's image readers \(ITKReader, .*--trust-model-code"):
        _open(folder)
    assert not marker.exists()
    pipeline = _open(folder, trust_code=True)  # harmless by construction: SegExplain never builds the loader
    assert not marker.exists() and pipeline.trusted_code == ["preprocessing::transforms::0::reader: 'os.system'"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ConfigParser(config).get_parsed_content("preprocessing")  # MONAI itself builds it, and runs the command
    assert marker.exists()  # positive control: the probe is live


class _Writer(nn.Module):
    """TorchScript that writes a file when it is loaded (``__setstate__``) and when it is run."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.written = torch.zeros(0, dtype=torch.uint8)  # kept, so that TorchScript keeps the writes

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path, self.training = state
        self.written = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8).fill_(65)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.written = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8).fill_(66)
        return x


def test_torchscript_is_code_and_needs_the_flag(tmp_path):
    written = tmp_path / "written"
    folder = _bundle(tmp_path / "bundle", {key: CONFIG[key] for key in ("preprocessing", "inferer")})
    (folder / "models" / "model.pt").unlink()
    torch.jit.save(torch.jit.script(_Writer(str(written))), folder / "models" / "model.ts")
    assert not written.exists()
    with pytest.raises(SegExplainError, match=r"bundle' has its network only as TorchScript \(models/model\.ts\): "
                                              r"TorchScript is code, .*--trust-model-code"):
        _open(folder)
    assert not written.exists()
    pipeline = _open(folder, trust_code=True)
    assert written.read_bytes() == b"A" * 16  # positive control: loading ran the bundle's code
    assert pipeline.trusted_code == ["models/model.ts: TorchScript"]
    pipeline.network(torch.zeros(1))
    assert written.read_bytes() == b"B" * 16  # and so does running it


def _probes(path):
    """Every name-taking field of a bundle configuration with ``path`` written into it: (field, name, config)."""
    def transform(item):
        return {**CONFIG, "preprocessing": {"_target_": "Compose", "transforms": [*LOADING, item]}}

    return [
        ("network_def::_target_", path, {**CONFIG, "network_def": {**NETWORK, "_target_": path}}),
        ("preprocessing::transforms::2::_target_", path, transform({"_target_": path, "keys": "image"})),
        ("network_def::act", path, {**CONFIG, "network_def": {**NETWORK, "act": path}}),
        ("network_def::norm", path, {**CONFIG, "network_def": {**NETWORK, "norm": [path, {}]}}),
        ("preprocessing::transforms::2::minv", path, transform({"_target_": "ScaleIntensityd", "keys": "image",
                                                                 "minv": f"${path}"})),
        ("preprocessing::transforms::2::minv", path, transform({"_target_": "ScaleIntensityd", "keys": "image",
                                                                 "minv": f"${path}('touch MARKER')"})),
        ("preprocessing::transforms::0::reader", path, {**CONFIG, "preprocessing": {
            "_target_": "Compose", "transforms": [{**LOADING[0], "reader": path}, LOADING[1]]}}),
    ]


def test_generated_probes_are_refused_naming_key_and_name_and_pass_the_gate_with_the_flag():
    targets, names = bundle_safety.allowed_targets(), bundle_safety._expression_names()
    start = time.perf_counter()
    paths = callable_paths(allowed=lambda obj: targets.allows(obj) or names.allows(obj))
    assert any(reaches(p, DANGEROUS[0]) for p in paths)  # os.system is among them (torch.hub.os.system...)
    probes = [probe for path in paths for probe in _probes(path)]
    for field, name, config in probes:
        with pytest.raises(SegExplainError) as raised:
            _gate(config)
        assert f"probe: {field} names " in str(raised.value) and name in str(raised.value), str(raised.value)
        _, found = _gate(config, trusted=True)
        assert any(entry.startswith(f"{field}: ") and name in entry for entry in found), (field, name, found)
    print(f"\n{len(paths)} paths, {len(probes)} probes refused without the flag and passing with it, "
          f"in {time.perf_counter() - start:.1f} s")
    assert len(paths) > 1000


def test_allowed_names_and_expressions_pass_and_are_handed_over_as_objects():
    from monai.networks.nets import UNet
    from monai.transforms import ScaleIntensityd

    config = {**CONFIG, "low": 0.0, "network_def": {**NETWORK, "_target_": "monai.networks.nets.unet.UNet",
                                                    "act": ["prelu", {"init": 0.2}], "norm": "batch",
                                                    "dropout": 0.1},
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "ScaleIntensityd", "keys": "image", "minv": "$float(@low) if len([1]) else -1.0",
                   "maxv": 1.0, "dtype": "$torch.float32"}]}}
    parser, found = _gate(config)
    assert found == []
    assert parser["network_def"]["_target_"] is UNet
    assert parser["preprocessing::transforms::0::_target_"] is ScaleIntensityd
    assert isinstance(parser.get_parsed_content("network_def"), UNet)


@pytest.mark.parametrize(("field", "value", "name"), [
    ("_mode_", "callable", "'callable'"),
    ("_debug_", True, "True"),
    ("dropout", "$torch.nn.Dropout", "'$torch.nn.Dropout'"),  # an allowed class, but not a literal factory name
    ("act", "@relu", "'@relu'"),
])
def test_modes_debugger_and_factory_arguments_that_are_not_literal_names_are_refused(field, value, name):
    with pytest.raises(SegExplainError, match=rf"probe: network_def::{field} names {re.escape(name)}"):
        _gate({**CONFIG, "relu": {"_target_": "torch.nn.ReLU"}, "network_def": {**NETWORK, field: value}})


@pytest.mark.parametrize(("expression", "part"), [
    ("$@x.__class__", "@x.__class__"),  # an attribute of a reference
    ("$@network_def.to(@device)", "@network_def.to"),
    ("$(lambda: 1)()", "lambda: 1"),
    ("$[i for i in @x]", "[i for i in @x]"),
    ("$len(**@x)", "**@x"),
    ("$__ref0__", "$__ref0__"),  # the name a reference stands for while checking
    ("$import os", "$import os"),
])
def test_expressions_outside_the_grammar_are_named_by_their_part(expression, part):
    assert bundle_safety._expression_part(expression) == part
    valid = "$[1.5] * 3 if @a#b and len(@c) > 2 else [torch.float32, np.int16(@d[0])]"
    assert bundle_safety._expression_part(valid) is None
