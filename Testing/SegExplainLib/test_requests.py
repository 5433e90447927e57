"""The typed requests of the application: checked when made, the same through JSON and through the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from SegExplainLib.application import options as opt
from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.requests import CaseRun, EvaluationRequest, EvaluationRun, ExplainRequest
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends import cli
from SegExplainLib.frontends.worker import Worker

MODELS = [
    ModelSource("card", "models/card.yaml"),
    ModelSource("card", "c.json", patch_size=(8, 16, 16), overlap=0.25, trust_code=True),
    ModelSource("spec", spec="monai:UNet", kwargs={"spatial_dims": 3, "channels": [4, 8]}, weights="w.safetensors"),
    ModelSource("nnunet", "results/Dataset001", configuration="3d_lowres", folds="0, all", checkpoint="best.pth",
                mirroring=False),
    ModelSource("bundle", "bundles/spleen", trust_code=True),
]
REQUESTS = [
    ExplainRequest(),
    ExplainRequest(label="seg.nii.gz", label_value=3, class_index=2, aggregation="normalized", samples=50),
    ExplainRequest(box_index=(0, 1, 2, 5, 6, 7), method="gradient", device="cpu", seed=5),
    ExplainRequest(box_ras=(1.5, -2, 3, 10, 12.25, 14), method="smoothgrad", options={"noise": 0.1, "layer": "up"}),
    ExplainRequest(box_lps=(0, 0, 0, 1, 1, 1), composite="epsilon_plus", layer_filter="pass:0.05,0.4"),
    ExplainRequest(point_ras=(12.5, -30, 44.125), radius=5, method="integrated_gradients", n_steps=32,
                   quadrature="gausslegendre", baseline="blur:2"),
    ExplainRequest(point_lps=(1, 2, 3), radius=0.5, method="integrated_gradients", tolerance=0.002),
    ExplainRequest(voxel=(9, 24, 24), radius=1, device="cuda:1"),
    ExplainRequest(whole_class=True, class_index=0),
]


def parsed(words: list[str]) -> CaseRun:
    return CaseRun.from_namespace(cli.parser().parse_args(["explain", *words]))


@pytest.mark.parametrize("model", MODELS)
def test_a_model_round_trips_through_json_and_words(model):
    assert ModelSource.from_json(json.loads(json.dumps(model.to_json()))) == model
    assert ModelSource.from_arguments(model.arguments()) == model
    assert parsed(["--input", "a.nii", "--output", "o", *model.arguments()]).model == model


@pytest.mark.parametrize("request_", REQUESTS)
def test_a_request_round_trips_through_json_and_words(request_):
    assert ExplainRequest.from_json(json.dumps(request_.to_json())) == request_
    assert ExplainRequest.from_arguments(request_.arguments()) == request_
    assert parsed(["--input", "a.nii", "--output", "o", "--card", "c.yaml", *request_.arguments()]).request == request_


def test_a_case_run_round_trips_through_json_and_words():
    run = CaseRun(("t2.nii.gz", "adc.nii.gz"), "results", MODELS[3], REQUESTS[5], sequence_names=("T2", "ADC"),
                  resample=True, ground_truth="gt.nii.gz", overwrite=True, filters=("pass:0.4", "clamp:0.2"),
                  figures=False, progress="json")
    assert CaseRun.from_json(json.loads(json.dumps(run.to_json()))) == run
    assert parsed(run.arguments()) == run
    assert cli.parser().parse_args(["explain", *run.arguments()]).output == "results"


def test_the_command_line_takes_its_defaults_from_the_classes():
    """A bare command line parses into the classes' defaults: the options define none of their own."""
    run = parsed(["--input", "a.nii", "--output", "o", "--card", "c.yaml"])
    assert run == CaseRun(("a.nii",), "o", ModelSource("card", "c.yaml"), ExplainRequest())
    bare = cli.parser().parse_args(["explain", "--input", "a.nii", "--output", "o"])
    for cls in (ModelSource, ExplainRequest, CaseRun):
        for field in dataclasses.fields(cls):
            meta = field.metadata["flag"]
            if meta.flag and not meta.switch and not meta.repeat and not meta.required and field.name != "kwargs":
                assert getattr(bare, field.name) == opt.default_of(cls, field.name), field.name
    assert json.loads(bare.kwargs) == opt.default_of(ModelSource, "kwargs") and bare.options == [] and bare.mirroring


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ModelSource("onnx"), "model kind must be one of card, spec, nnunet, bundle, got 'onnx'"),
    (lambda: ModelSource("spec"), "a model of kind 'spec' needs its spec"),
    (lambda: ModelSource("spec", "x.pt", spec="reference"), "a model spec has no path .* got path 'x.pt'"),
    (lambda: ModelSource("card", weights="w.pt"), "weights belong to a model spec, not a model card"),
    (lambda: ModelSource("bundle", "b", folds="0"), "folds belong to an nnU-Net results folder, not a MONAI bundle"),
    (lambda: ModelSource("nnunet", "n", patch_size=(8, 8, 8)), "--patch-size is for --model/--card"),
    (lambda: ModelSource("card", patch_size=(8, 8)), r"patch_size must be a list of 3 numbers \(integers\), got"),
    (lambda: ModelSource("card", patch_size=(0, 8, 8)), r"patch_size must be 3 integers >= 1, got \(0, 8, 8\)"),
    (lambda: ModelSource("card", overlap=1.0), "overlap must be a finite number >= 0 and < 1, got 1.0"),
    (lambda: ModelSource("card", trust_code="yes"), "trust_code must be True or False, got 'yes'"),
    (lambda: ModelSource("spec", spec="reference", kwargs=[1]), r"kwargs must be a JSON object .* got \[1\]"),
    (lambda: ExplainRequest(voxel=(1, 2)), r"voxel must be a list of 3 numbers \(integers\), got \(1, 2\)"),
    (lambda: ExplainRequest(voxel=(1, 2, 3), whole_class=True), "give one region at most, got voxel and whole_class"),
    (lambda: ExplainRequest(radius=-1), "radius must be a finite number >= 0, got -1"),
    (lambda: ExplainRequest(class_index=True), "class_index must be an integer >= 0, got True"),
    (lambda: ExplainRequest(aggregation="mean"), "aggregation must be one of sum, normalized, got 'mean'"),
    (lambda: ExplainRequest(samples=0), "samples must be an integer >= 1, got 0"),
    (lambda: ExplainRequest(method="lrpp"), "unknown method 'lrpp'; expected one of"),
    (lambda: ExplainRequest(layer_filter="pass"), "pass"),
    (lambda: ExplainRequest(n_steps=0), "n_steps must be an integer >= 1, got 0"),
    (lambda: ExplainRequest(quadrature="simpson"), "quadrature must be one of adaptive, .* got 'simpson'"),
    (lambda: ExplainRequest(tolerance=0.0), "tolerance must be a finite number > 0, got 0.0"),
    (lambda: ExplainRequest(baseline="noise"), "noise"),
    (lambda: ExplainRequest(options={"": 1}), "options must be a JSON object with text keys"),
    (lambda: ExplainRequest(options={"x": {1, 2}}), "options must hold JSON values only"),
    (lambda: ExplainRequest(device="gpu"), "device must be 'auto', 'cpu' or 'cuda\\[:N\\]', got 'gpu'"),
    (lambda: ExplainRequest(seed=-1), "seed must be an integer >= 0, got -1"),
    (lambda: ExplainRequest(preview=1), "preview must be True or False, got 1"),
    (lambda: CaseRun((), "o", ModelSource()), "inputs must name at least one image file, got none"),
    (lambda: CaseRun(("a",), "", ModelSource()), "output must name a folder, got ''"),
    (lambda: CaseRun(("a",), "o", "card.yaml"), "model must be a ModelSource, got 'card.yaml'"),
    (lambda: CaseRun(("a",), "o", ModelSource(), filters=("band:0.2",)), "band"),
    (lambda: CaseRun(("a",), "o", ModelSource(), progress="dots"), "progress must be one of bar, json, none"),
    (lambda: EvaluationRequest(methods=()), "methods must name at least one method to score, got none"),
    (lambda: EvaluationRequest("voxel"), "request must be an ExplainRequest, got 'voxel'"),
    (lambda: EvaluationRequest(ExplainRequest(aggregation="normalized", samples=4)),
     "samples=4 has no use in a scorecard"),
    (lambda: EvaluationRequest(steps=0), "steps must be an integer >= 1, got 0"),
])
def test_each_bad_value_is_named_in_one_line(make, message):
    with pytest.raises(SegExplainError, match=message) as raised:
        make()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("cls", [ModelSource, ExplainRequest, CaseRun, EvaluationRequest])
def test_json_with_unknown_keys_or_bad_values_is_refused(cls):
    with pytest.raises(SegExplainError, match=rf"{cls.__name__} has no key\(s\) 'bogus', 'colour'; expected some of"):
        cls.from_json({"bogus": 1, "colour": "red"})
    with pytest.raises(SegExplainError, match=rf"a {cls.__name__} must be a JSON object, got \[1\]"):
        cls.from_json([1])
    with pytest.raises(SegExplainError, match=rf"a {cls.__name__} must be a JSON object, got '\{{x'"):
        cls.from_json("{x")


def test_case_run_json_checks_its_model_and_request():
    data = CaseRun(("a",), "o", ModelSource()).to_json()
    with pytest.raises(SegExplainError, match="seed must be an integer >= 0, got -2"):
        CaseRun.from_json({**data, "request": {**data["request"], "seed": -2}})
    with pytest.raises(SegExplainError, match="ModelSource has no key\\(s\\) 'script'"):
        CaseRun.from_json({**data, "model": {**data["model"], "script": "rm -rf /"}})


def test_the_workers_evaluation_request_has_the_runs_scoring_and_travels_as_json():
    run = EvaluationRun(CaseRun(("a",), "o", ModelSource(), ExplainRequest(voxel=(1, 2, 3), seed=4)))
    request = EvaluationRequest(run.case.request)
    assert request.evaluation_options() == run.evaluation_options()  # the same defaults, device and seed
    changed = EvaluationRequest(ExplainRequest(class_index=2), methods=("gradient", "lrp"),
                                method_options={"lrp": {"composite": "epsilon_plus"}}, scores=("faithfulness",),
                                block_size=2, reference="road", batch_size=3)
    for made in (request, changed):
        assert EvaluationRequest.from_json(json.loads(json.dumps(made.to_json()))) == made
    with pytest.raises(SegExplainError, match="unknown method 'nope'"):
        EvaluationRequest.from_json({**changed.to_json(), "methods": ["nope"]})


def test_the_worker_answers_a_request_with_a_bad_field_with_its_error():
    """The child reads every message with the same classes: a hand-made header with a bad field (what a buggy host
    could send) is answered failed with the class's message, and the worker stays warm for the next request."""
    with Worker(ModelSource()) as worker:
        worker.start()
        bad_load = worker._request({"op": "load", "model": {"kind": "onnx"}})
        with pytest.raises(SegExplainError, match="model kind must be one of card, spec, nnunet, bundle, got 'onnx'"):
            worker.wait(bad_load, timeout=120)
        worker.wait(worker.load_request, timeout=120)  # the first load, of the demo card, went through
        for bad, message in (({"seed": -1}, "seed must be an integer >= 0, got -1"),
                             ({"bogus": 1}, "ExplainRequest has no key\\(s\\) 'bogus'")):
            with pytest.raises(SegExplainError, match=message):
                worker.wait(worker._request({"op": "explain", "explain": bad}), timeout=60)
        assert worker.state == "running" and worker.starts == 1
