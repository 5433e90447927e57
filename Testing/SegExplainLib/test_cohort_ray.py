"""``segexplain cohort --workers N``: warm Ray actors write the same cohort as the serial run."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegExplainLib.application.demo import SEQUENCE_NAMES, write_demo_case
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends import cli, raycohort
from SegExplainLib.io.imaging import Geometry, write_volume
from SegExplainLib.models.demo_card import demo_card_path

EXPLAIN = ["--card", str(demo_card_path()), "--class", "1", "--method", "lrp", "--composite", "epsilon_plus",
           "--device", "cpu", "--filter", "pass:0.4"]
#: Timing, and what the number of torch threads changes in the last digits of a sum
TIMING = {"seconds"}
GOOD = ["c0", "c1", "c2"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Three demo cases, one with a sequence missing (fails when read) and one too small for the network (fails
    in the worker), as a CSV."""
    root = tmp_path_factory.mktemp("cases")
    rows = ["case,inputs,ground_truth"]
    for name, seed in zip(GOOD, (1000, 1001, 1002)):
        paths, label = write_demo_case(root / name, seed)
        rows.append(f"{name},{';'.join(map(str, paths))},{label}")
    rows.append(f"missing_sequence,{';'.join(map(str, paths[:5]))},")
    geometry = Geometry(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                        size=(3, 3, 1))
    tiny = [write_volume(np.ones((1, 3, 3), np.float32) * c, geometry, root / f"tiny_{name}.nii.gz")
            for c, name in enumerate(SEQUENCE_NAMES)]
    rows.append(f"too_small,{';'.join(map(str, tiny))},")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    (root / "good.csv").write_text("\n".join(rows[:4]) + "\n")
    return root


@pytest.fixture(scope="module")
def serial(cases):
    """Today's cohort: one case after another, the model loaded per case."""
    output = cases / "serial"
    assert cli.main(["cohort", "--cases", str(cases / "cases.csv"), "--output", str(output), "--", *EXPLAIN]) == 1
    return output


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; the command line uses it instead of starting its own."""
    pytest.importorskip("ray")
    import ray

    assert raycohort.start_ray() and ray.is_initialized()
    yield ray
    ray.shutdown()


def cohort(cases, output, *options, csv_name="cases.csv"):
    return cli.main(["cohort", "--cases", str(cases / csv_name), "--output", str(output), *options, "--", *EXPLAIN])


def read_map(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_same_json(actual, expected, where=""):
    """Equal, numbers within float32 round-off of their magnitude."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same_json(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_json(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-5), (where, actual, expected)
    else:
        assert actual == expected, where


def table(path):
    with path.open(newline="") as handle:
        return [{k: float(v) if k.startswith(("share", "ground")) else v for k, v in row.items()}
                for row in csv.DictReader(handle)]


def test_validation_errors(cases, capsys, monkeypatch):
    for workers in ("0", "-2"):
        assert cohort(cases, cases / "v", "--workers", workers) == cli.EXIT_ERROR
        assert f"--workers must be 1 or more (the number of Ray workers), got {workers}" in capsys.readouterr().err
    assert cohort(cases, cases / "v", "--address", "10.0.0.1:6379") == cli.EXIT_ERROR
    assert "--address '10.0.0.1:6379' names a Ray cluster for the workers: pass --workers N" in capsys.readouterr().err
    assert cohort(cases, cases / "v", "--workers", "2", "--address", "nowhere") == cli.EXIT_ERROR
    assert "--address must be HOST:PORT, ray://HOST:PORT or auto, got 'nowhere'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert cohort(cases, cases / "v", "--workers", "1") == cli.EXIT_ERROR
    assert 'pip install "segexplain[ray]"' in capsys.readouterr().err
    assert not (cases / "v").exists()


def test_an_address_where_no_cluster_runs_is_refused_at_once(cases, capsys):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cohort(cases, cases / "a", "--workers", "1", "--address", f"127.0.0.1:{port}") == cli.EXIT_ERROR
    assert f"no Ray cluster answers at --address '127.0.0.1:{port}'" in capsys.readouterr().err


def test_a_cluster_given_by_address_is_named_as_where_the_images_go(local_ray, capsys):
    address = local_ray.get_runtime_context().gcs_address
    assert raycohort.start_ray(address) is False  # the Ray of this process is used as it is
    assert capsys.readouterr().err == (f"note: the case images, the model and its options are sent to the Ray cluster "
                                       f"at {address}; anyone who controls that cluster can read them (see "
                                       f"docs/security.md)\n")
    assert raycohort.start_ray() is False and capsys.readouterr().err == ""  # a local Ray: nothing leaves the machine


def test_request_options_survive_the_way_to_the_workers():
    """The driver sends the actors the model and the request as their JSON: every option comes back the same."""
    from SegExplainLib.application.model_source import ModelSource
    from SegExplainLib.application.requests import CaseRun, ExplainRequest

    for model in (["--card", "c.json", "--patch-size", "8", "16", "16", "--overlap", "0.25"],
                  ["--nnunet", "n", "--folds", "0", "all", "--no-mirroring", "--configuration", "2d"]):
        argv = ["explain", "--input", "a.nii", "--output", "o", *model, "--trust-model-code", "--point-ras", "1.5",
                "-30", "4", "--radius", "2", "--class", "2", "--method", "integrated_gradients", "--n-steps", "8",
                "--option", "window=4", "--option", "x=1", "--filter", "pass:0.4", "--seed", "3", "--label-value", "2"]
        run = CaseRun.from_namespace(cli.parser().parse_args(argv))
        sent = json.loads(json.dumps({"model": run.model.to_json(), "request": run.request.to_json()}))
        assert ModelSource.from_json(sent["model"]) == run.model and run.model.trust_code
        assert ExplainRequest.from_json(sent["request"]) == run.request
        assert run.request.options == {"window": 4, "x": 1} and run.request.point_ras == (1.5, -30.0, 4.0)


def test_two_workers_write_the_serial_cohort(cases, serial, local_ray, capsys):
    output = cases / "ray"
    assert cohort(cases, output, "--workers", "2") == cli.EXIT_CASES_FAILED
    err = capsys.readouterr().err
    assert "[5/5]" in err and "3 of 5 cases explained; 2 failed" in err
    failures = json.loads((output / "failures.json").read_text())
    assert failures == json.loads((serial / "failures.json").read_text())
    assert list(failures) == ["missing_sequence", "too_small"]
    assert "5 inputs (case_1002_T2, " in failures["missing_sequence"]
    assert "the model's 6 sequences, in order: T2, T1, " in failures["missing_sequence"]
    assert failures["too_small"].startswith("SegExplainError: the model failed on an image of shape (6, 1, 3, 3): input "
                                            "of spatial size (1, 3, 3) is too small for this U-Net")
    ray_rows, serial_rows = table(output / "cohort.csv"), table(serial / "cohort.csv")
    assert [(r["case"], r["sequence"]) for r in ray_rows] == [(r["case"], r["sequence"]) for r in serial_rows]
    assert_same_json(ray_rows, serial_rows)
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in serial.iterdir())
    assert sorted(p.name for p in (output / "cases").iterdir()) == GOOD
    for name in GOOD:
        files = sorted(p.name for p in (serial / "cases" / name).iterdir())
        assert sorted(p.name for p in (output / "cases" / name).iterdir()) == files
        assert sum(f.startswith("relevance_") for f in files) == 12 and "montage.png" in files  # 6 + 6 filtered
        summaries = [json.loads((folder / "cases" / name / "summary.json").read_text()) for folder in (output, serial)]
        assert_same_json(*[{k: v for k, v in s.items() if k not in TIMING} for s in summaries], where=name)
        for file in files:
            if file.startswith("relevance_"):
                expected = read_map(serial / "cases" / name / file)
                np.testing.assert_allclose(read_map(output / "cases" / name / file), expected, rtol=1e-4,
                                           atol=1e-5 * np.abs(expected).max())


def test_workers_resume_and_recompute_nothing_finished(cases, serial, local_ray, capsys, monkeypatch):
    output = cases / "ray_resume"
    assert cohort(cases, output, "--workers", "2") == cli.EXIT_CASES_FAILED
    written = {name: (output / "cases" / name / "summary.json").stat().st_mtime_ns for name in GOOD}
    (output / "cases" / "c1" / "summary.json").unlink()  # an unfinished case
    assert cohort(cases, output, "--workers", "2") == cli.EXIT_CASES_FAILED
    assert "[1/5] c0 (finished earlier)" in capsys.readouterr().err
    again = {name: (output / "cases" / name / "summary.json").stat().st_mtime_ns for name in GOOD}
    assert again["c0"] == written["c0"] and again["c2"] == written["c2"] and again["c1"] > written["c1"]
    assert (output / "cohort.csv").read_text().count("\nc1,") == 6

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started with nothing to do")

    monkeypatch.setattr(raycohort, "start_ray", no_ray)
    assert cohort(cases, output, "--workers", "2", csv_name="good.csv") == 0
    assert {name: (output / "cases" / name / "summary.json").stat().st_mtime_ns for name in GOOD} == again
    assert json.loads((output / "failures.json").read_text()) == {}


#: A process that starts Ray as ``cohort --workers`` does, runs a task, prints its address, and ends Ray at end of
#: input.
LOCAL_RAY = """
import sys
import ray
from SegExplainLib.frontends import raycohort
raycohort.start_ray()
print(ray.get(ray.remote(lambda: "ran").remote()), ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""
#: Another process of this machine, or of one that reaches it, connecting to that Ray and running a task.
INTRUDER = """
import logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
print(ray.get(ray.remote(lambda: "ran").remote()))
"""


def test_a_local_ray_lets_in_only_processes_with_the_runs_token(tmp_path):
    """Ray listens on every interface and cannot be bound to loopback, and a user's RAY_AUTH_MODE=disabled (or Ray's
    default before 2.60) left it open to anyone who reaches the machine. The local Ray now always wants a token drawn
    for the run, held in the environment of its processes, never in a file (~/.ray/auth_token)."""
    pytest.importorskip("ray")
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    cluster = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], env=base | {"RAY_AUTH_MODE": "disabled"},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ran, address = cluster.stdout.readline().split()
        assert ran == "ran"
        intruder = subprocess.run([sys.executable, "-c", INTRUDER, address], capture_output=True, text=True,
                                  env=base | {"RAY_gcs_server_port_wait_time_s": "1"}, timeout=120)  # one try, not 20
        assert intruder.returncode != 0 and "ran" not in intruder.stdout
        assert "Authentication token is missing or incorrect" in intruder.stderr
        assert not (home / ".ray").exists()  # no token file, in the home that Ray would have written it to
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()


def test_a_ray_without_the_token_api_starts_no_local_cluster(monkeypatch):
    """The token calls are Ray's private names: a Ray without them is refused before anything starts, never run
    without the token."""
    raylet = pytest.importorskip("ray._raylet")
    monkeypatch.delattr(raylet, "AuthenticationTokenLoader")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(SegExplainError, match=r"starts a local Ray only with token authentication.*tested with Ray"):
        raycohort._require_local_token()
    assert "RAY_AUTH_MODE" not in os.environ


def test_ray_workers_are_sent_the_whole_library(monkeypatch):
    """A cluster's workers import SegExplainLib from the runtime environment: it ships the package folder itself, not
    the folder of the front end that starts Ray."""
    import SegExplainLib

    calls = []

    class FakeRay:
        is_initialized = staticmethod(lambda: False)
        init = staticmethod(lambda **options: calls.append(options))

    monkeypatch.setattr(raycohort, "import_ray", lambda: FakeRay)
    monkeypatch.setattr(raycohort, "_require_local_token", lambda: None)
    assert raycohort.start_ray(None)
    (shipped,) = calls[0]["runtime_env"]["py_modules"]
    assert shipped == str(Path(SegExplainLib.__file__).resolve().parent)
