"""nnU-Net results folders from strangers: no name of ``plans.json`` or of a checkpoint runs code without the flag.

Each refusal has a positive control: the same file runs its code with ``trust_code=True``. The adversarial generator
(:mod:`attribute_probes`) writes every dotted path from torch, monai, numpy and dynamic_network_architectures to a
callable outside the allow-lists, and every bare name nnunetv2's class finder would find, into every name-taking field.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import operator
import pkgutil
import pydoc
import shutil

import numpy as np
import pytest
import torch
from attribute_probes import callable_paths

from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import Geometry
from SegExplainLib.models.nnunet import open_nnunet
from SegExplainLib.models.nnunet_safety import allow_lists, find_trainer, plans_objects

ISSUE_PROBE = "torch.nn.functional.torch.hub.os.system"  # walks functional -> torch -> hub -> os -> system
#: Each name-taking field of a configuration: how to write a name into it, and how the refusal names it.
FIELDS = {
    "architecture.network_class_name": lambda c, name: c["architecture"].update(network_class_name=name),
    **{f"architecture.arch_kwargs.{field}": functools.partial(
        lambda field, c, name: c["architecture"]["arch_kwargs"].update({field: name}), field)
       for field in ("conv_op", "norm_op", "dropout_op", "nonlin")},
    "preprocessor_name": lambda c, name: c.update(preprocessor_name=name),
    "normalization_schemes[1]": lambda c, name: c["normalization_schemes"].__setitem__(1, name),
    **{field: functools.partial(lambda field, c, name: c.update({field: name}), field)
       for field in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")},
}
#: The packages whose modules nnunetv2's ``recursive_find_python_class`` searches for a bare name from the plans.
SEARCHED = ("nnunetv2.preprocessing", "nnunetv2.utilities.label_handling")


def _copy(nnunet_model, tmp_path):
    folder = tmp_path / nnunet_model.name
    shutil.copytree(nnunet_model, folder, ignore=shutil.ignore_patterns("fold_1"))
    return folder


def _edit_plans(folder, edit):
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans["configurations"]["3d_fullres"], plans)
    (folder / "plans.json").write_text(json.dumps(plans))


def _case():
    image = np.zeros((2, 16, 28, 24), np.float32)
    image[:, 1:-1, 2:-2, 2:-2] = np.random.default_rng(0).normal(200.0, 15.0, (2, 14, 24, 20))
    return image, Geometry(spacing=(0.8, 0.8, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                           size=(24, 28, 16))


@pytest.mark.parametrize("field", ["nonlin", "dropout_op"])
def test_the_issues_probe_runs_nothing_without_the_flag_and_runs_with_it(nnunet_model, tmp_path, field):
    folder = _copy(nnunet_model, tmp_path)
    marker = tmp_path / "MARKER"

    def probe(configuration, _):
        configuration["architecture"]["arch_kwargs"].update({field: ISSUE_PROBE,
                                                             f"{field}_kwargs": {"command": f"touch {marker}"}})
    _edit_plans(folder, probe)
    with pytest.raises(SegExplainError) as refused:
        open_nnunet(folder)
    assert f"{folder / 'plans.json'}" in str(refused.value)
    assert f"architecture.arch_kwargs.{field} {ISSUE_PROBE!r}" in str(refused.value)
    assert not marker.exists()
    with pytest.raises(TypeError):  # os.system returns an int, which is no layer
        open_nnunet(folder, trust_code=True)
    assert marker.exists()  # positive control: the same file runs its command with the flag


def _bare_names(allowed):
    """The public callables of the modules nnunetv2 would search for a bare name, by name (``load_pickle``...)."""
    names = set()
    for package_name in SEARCHED:
        for info in pkgutil.walk_packages(importlib.import_module(package_name).__path__, f"{package_name}."):
            module = importlib.import_module(info.name)
            names.update(name for name, obj in vars(module).items()
                         if not name.startswith("_") and callable(obj) and not allowed(obj))
    return sorted(names)


def test_generated_probes_in_every_field_are_refused_without_the_flag(nnunet_model):
    """Every generated name in every name-taking field (and trainer_name) is refused, naming field and name."""
    union = functools.reduce(operator.or_, allow_lists().values())
    probes = [ISSUE_PROBE, *callable_paths(allowed=union.allows), *_bare_names(union.allows)]
    assert "torch.os.system" in probes and "load_pickle" in probes  # the generator reaches what it must
    plans = json.loads((nnunet_model / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert plans_objects(plans, configuration, source="plans.json", trust_code=False) is not None
    refused = 0
    for field, write in FIELDS.items():
        edited = copy.deepcopy(configuration)
        for name in probes:
            write(edited, name)
            with pytest.raises(SegExplainError) as error:
                plans_objects(plans, edited, source="plans.json", trust_code=False)
            assert f"plans.json names {field} {name!r}" in str(error.value)
            assert plans_objects(plans, edited, source="plans.json", trust_code=True) is None  # left to nnunetv2
            refused += 1
    for name in probes:
        with pytest.raises(SegExplainError, match="names label_manager"):
            plans_objects({**plans, "label_manager": name}, configuration, source="plans.json", trust_code=False)
        for trust_code in (False, True):  # nnunetv2 finds trainers by class name, never by a path or a function
            with pytest.raises(SegExplainError) as error:
                find_trainer(name, source="checkpoint", trust_code=trust_code)
            assert f"checkpoint names trainer_name {name!r}" in str(error.value)
        refused += 2  # label_manager and trainer_name, without the flag
    assert refused == (len(FIELDS) + 2) * len(probes) > 10000


def test_names_are_never_resolved_by_nnunetv2_without_the_flag(nnunet_model, tmp_path, monkeypatch):
    """nnunetv2's finders fail here; the model still opens and preprocesses, so nnunetv2 got objects, not names.

    image_reader_writer and experiment_planner_used, which SegExplain does not check, hold the issue's probe: nothing
    reads them (they serve nnunetv2's own file reading and planning).
    """
    from nnunetv2.imageio import reader_writer_registry
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.preprocessing.resampling import utils
    from nnunetv2.utilities import get_network_from_plans
    from nnunetv2.utilities.label_handling import label_handling
    from nnunetv2.utilities.plans_handling import plans_handler

    def resolving(*args, **kwargs):
        raise AssertionError(f"nnunetv2 resolved {args}")
    monkeypatch.setattr(pydoc, "locate", resolving)
    for module in (default_preprocessor, utils, get_network_from_plans, label_handling, plans_handler,
                   reader_writer_registry):
        monkeypatch.setattr(module, "recursive_find_python_class", resolving)
    folder = _copy(nnunet_model, tmp_path)
    _edit_plans(folder, lambda _, plans: plans.update(image_reader_writer=ISSUE_PROBE,
                                                      experiment_planner_used=ISSUE_PROBE))
    pipeline = open_nnunet(folder)
    prepared = pipeline.prepare(*_case())
    assert prepared.input.shape[0] == 2 and np.isfinite(prepared.input).all()
    with pytest.raises(AssertionError, match="nnunetv2 resolved"):  # control: the flag lets nnunetv2 resolve them
        open_nnunet(folder, trust_code=True).prepare(*_case())


def test_an_unknown_trainer_is_one_line_naming_it_and_the_checkpoint(nnunet_model, tmp_path):
    folder = _copy(nnunet_model, tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    torch.save({**checkpoint, "trainer_name": "nnUNetTrainerNotInstalled"}, path)
    with pytest.raises(SegExplainError) as error:
        open_nnunet(folder)
    assert "trainer_name 'nnUNetTrainerNotInstalled'" in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_trainer_with_its_own_build_needs_the_flag(nnunet_model, tmp_path):
    """nnUNetTrainerBN looks conv_op up with pydoc.locate in its own build_network_architecture."""
    folder = _copy(nnunet_model, tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    torch.save({**torch.load(path, weights_only=False), "trainer_name": "nnUNetTrainerBN"}, path)
    with pytest.raises(SegExplainError, match="'nnUNetTrainerBN', which builds its network with its own"):
        open_nnunet(folder)
    # with the flag its build runs: batch norms, which the instance-norm weights of this model do not fit
    with pytest.raises(SegExplainError, match="do not fit the network"):
        open_nnunet(folder, trust_code=True)


def test_a_folder_without_plans_names_the_missing_file(nnunet_model, tmp_path):
    folder = _copy(nnunet_model, tmp_path)
    (folder / "plans.json").unlink()
    with pytest.raises(SegExplainError, match=r"has fold_0/checkpoint_final\.pth but no plans\.json"):
        open_nnunet(folder)
