"""segexplain explain: files in, maps out with the input's geometry; bad input gives one line and exit 2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegExplainLib.engine.api import explain
from SegExplainLib.engine.targets import BoxTarget
from SegExplainLib.frontends import cli
from SegExplainLib.models.demo_card import demo_card_path
from SegExplainLib.models.networks import tiny_unet

SHAPE = (6, 8, 10)  # D, H, W
SPACING = (0.8, 0.9, 3.0)  # x, y, z
ORIGIN = (-12.0, 40.0, 7.5)
ANGLE = math.radians(30)
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), 0.0, math.sin(ANGLE), math.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def write_image(path, array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(0)
    images = [write_image(tmp_path / f"seq{i}.nii.gz", rng.normal(size=SHAPE).astype(np.float32)) for i in range(2)]
    model = tiny_unet().eval()  # as the command line loads it
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    return {"images": [str(p) for p in images], "weights": str(weights), "model": model, "dir": tmp_path}


def base_args(case, output):
    return ["explain", "--input", *case["images"], "--model", "SegExplainLib.models:tiny_unet",
            "--weights", case["weights"], "--output", str(output), "--no-figures", "--progress", "none"]


def test_round_trip_keeps_geometry_and_matches_the_library(case):
    output = case["dir"] / "out"
    code = cli.main([*base_args(case, output), "--box-index", "1", "2", "2", "4", "6", "7",
                     "--composite", "epsilon", "--sequence-names", "T2", "FLAIR", "--filter", "pass:0.4"])
    assert code == 0
    reference = sitk.ReadImage(case["images"][0])
    arrays = []
    for name in ("T2", "FLAIR"):
        written = sitk.ReadImage(str(output / f"relevance_{name}.nii.gz"))
        np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-5)
        arrays.append(sitk.GetArrayFromImage(written))
        assert (output / f"relevance_pass_0.4_{name}.nii.gz").exists()
    image = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in case["images"]])
    expected = explain(case["model"], image, BoxTarget((1, 2, 2), (4, 6, 7), class_index=1), "lrp",
                       composite="epsilon").maps
    np.testing.assert_allclose(np.stack(arrays), expected, rtol=1e-5, atol=1e-7)

    summary = json.loads((output / "summary.json").read_text())
    assert summary["method"] == "lrp" and summary["options"]["composite"] == "epsilon"
    assert summary["target"]["kind"] == "box" and summary["sequence_names"] == ["T2", "FLAIR"]
    assert sum(summary["relevance_shares"]["absolute"].values()) == pytest.approx(1.0)
    assert summary["geometry"]["spacing"] == pytest.approx(list(SPACING))
    assert not list(case["dir"].glob(".out.partial-*"))


def test_point_in_ras_becomes_the_voxel_slicer_shows(case):
    reference = sitk.ReadImage(case["images"][0])
    lps = reference.TransformIndexToPhysicalPoint((4, 3, 2))  # x, y, z index = (w, h, d)
    ras = (-lps[0], -lps[1], lps[2])
    output = case["dir"] / "point"
    assert cli.main([*base_args(case, output), "--point-ras", *map(str, ras), "--method", "gradient"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["target"]["index"] == [2, 3, 4] and summary["region_voxels"] == 1


def test_json_progress_lines(case, capsys):
    output = case["dir"] / "json"
    args = base_args(case, output)
    args[args.index("none")] = "json"
    assert cli.main([*args, "--method", "gradient"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines][-1] == "done"
    fractions = [line["fraction"] for line in lines]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert lines[-1]["output"] == str(output)


def test_ig_quadrature_options_and_warnings(case, capsys):
    """--quadrature and --tolerance reach IG; a completeness warning is printed (and is a JSON event for GUIs)."""
    output = case["dir"] / "ig"
    ig = ["--method", "integrated_gradients", "--baseline", "zero", "--whole-class"]
    assert cli.main([*base_args(case, output), *ig, "--quadrature", "gausslegendre", "--n-steps", "2"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["options"]["quadrature"] == "gausslegendre" and summary["options"]["n_steps"] == 2
    assert summary["relative_delta"] > 0.05 and "misses completeness" in summary["warnings"][0]
    assert f"warning: {summary['warnings'][0]}" in capsys.readouterr().err.splitlines()

    args = base_args(case, case["dir"] / "ig-json")
    args[args.index("none")] = "json"
    assert cli.main([*args, *ig, "--quadrature", "gausslegendre", "--n-steps", "2"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["message"] for e in events if e["event"] == "warning"] == summary["warnings"]

    assert cli.main([*base_args(case, case["dir"] / "adaptive"), *ig, "--tolerance", "0.002"]) == 0
    adaptive = json.loads((case["dir"] / "adaptive" / "summary.json").read_text())
    assert adaptive["options"]["quadrature"] == "adaptive" and adaptive["options"]["tolerance"] == 0.002
    assert adaptive["relative_delta"] < 0.05 and not adaptive["warnings"]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--input", "missing.nii.gz"], "missing.nii.gz"),
    (["--voxel", "50", "0", "0"], r"voxel \(50, 0, 0\) lies outside"),
    (["--point-lps", "1000", "1000", "1000"], "outside"),
    (["--class", "5"], "class_index 5 is out of range"),
    (["--model-kwargs", "{bad"], "--model-kwargs must be JSON"),
    (["--method", "shap"], "unknown method 'shap'"),
])
def test_bad_input_gives_one_line_and_exit_2(case, capsys, extra, message):
    output = case["dir"] / "bad"
    args = base_args(case, output)
    if extra[0] == "--input":
        args[args.index("--input") + 1:args.index("--input") + 3] = [str(case["dir"] / extra[1])]
        extra = []
    assert cli.main([*args, *extra]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert not output.exists() and not list(case["dir"].glob(".bad.partial-*"))


def test_mismatched_grids_nan_voxels_and_wrong_channel_count(case, capsys):
    other = case["dir"] / "other.nii.gz"
    image = sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(other))
    args = base_args(case, case["dir"] / "o1")
    args[args.index("--input") + 2] = str(other)
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "spacing" in err and "pass --resample to resample it" in err and "resample=True" not in err
    assert cli.main([*base_args(case, case["dir"] / "o4"), "--label", str(other)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "not on the image grid" in err and "pass --resample" in err and "resample=True" not in err

    nan = np.zeros(SHAPE, np.float32)
    nan[1, 1, 1] = np.nan
    args = base_args(case, case["dir"] / "o2")
    # NIfTI writing turns NaN into 0, MetaImage keeps it
    args[args.index("--input") + 2] = str(write_image(case["dir"] / "nan.mha", nan))
    assert cli.main(args) == cli.EXIT_ERROR
    assert "NaN/Inf" in capsys.readouterr().err

    args = base_args(case, case["dir"] / "o3")
    del args[args.index("--input") + 2]
    assert cli.main(args) == cli.EXIT_ERROR
    assert "expects 2 input channels" in capsys.readouterr().err


def test_label_segment_and_empty_label(case, capsys):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 3:5, 3:6] = 2
    label_path = write_image(case["dir"] / "labels.nii.gz", labels)
    output = case["dir"] / "label"
    assert cli.main([*base_args(case, output), "--label", str(label_path), "--label-value", "2",
                     "--method", "gradient"]) == 0
    assert json.loads((output / "summary.json").read_text())["region_voxels"] == 12
    assert cli.main([*base_args(case, case["dir"] / "empty"), "--label", str(label_path),
                     "--label-value", "7"]) == cli.EXIT_ERROR
    assert "label value 7 does not occur" in capsys.readouterr().err


def test_segment_matrix_is_written_as_csv_figure_and_summary_entry(case, capsys):
    from SegExplainLib.engine.segments import segment_matrix
    from SegExplainLib.io.imaging import read_sequences

    output = case["dir"] / "matrix"
    args = [a for a in base_args(case, output) if a != "--no-figures"]
    assert cli.main([*args, "--method", "gradient", "--segment-matrix"]) == 0
    assert "segment matrix (gradient, batched passes: 1)" in capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    image, _ = read_sequences(case["images"])
    reference = segment_matrix(case["model"], image, method="gradient", device="cpu")
    recorded = summary["segment_matrix"]
    assert recorded["rows"] == recorded["columns"] == ["background", "label 1"]
    np.testing.assert_allclose(recorded["positive_sums"], reference.positive, rtol=1e-5)
    assert (output / "segment_matrix.csv").read_text().splitlines()[0] == (
        "output segment \\ input segment,background,label 1,positive relevance,negative share,status")
    assert "segment_matrix.csv" in summary["files"] and "segment_matrix.png" in summary["figures"]
    assert (output / "segment_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segment_matrix_of_a_label_map_and_its_errors(case, capsys):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 3:5, 3:6] = 3
    label_path = write_image(case["dir"] / "organs.nii.gz", labels)
    output = case["dir"] / "organs"
    assert cli.main([*base_args(case, output), "--method", "gradient", "--segment-matrix", "--segment-labels",
                     str(label_path)]) == 0
    recorded = json.loads((output / "summary.json").read_text())["segment_matrix"]
    assert recorded["columns"] == ["background", "label 3"] and recorded["segmentation"] == "given"
    explained = [row for row, status in zip(recorded["shares"], recorded["status"]) if status == "explained"]
    assert explained and np.allclose(np.sum(explained, axis=1), 1.0)
    small = write_image(case["dir"] / "small.nii.gz", labels[:, :, :5])
    assert cli.main([*base_args(case, case["dir"] / "bad"), "--segment-matrix", "--segment-labels",
                     str(small)]) == cli.EXIT_ERROR
    assert "small.nii.gz" in capsys.readouterr().err
    assert cli.main([*base_args(case, case["dir"] / "bad"), "--segment-labels", str(label_path)]) == cli.EXIT_ERROR
    assert "needs segment_matrix (--segment-matrix)" in capsys.readouterr().err


def test_existing_results_are_not_overwritten_unless_asked(case, capsys):
    output = case["dir"] / "keep"
    assert cli.main([*base_args(case, output), "--method", "gradient"]) == 0
    assert (output / cli.OUTPUT_MARKER).is_file()
    first = (output / "summary.json").read_text()
    assert cli.main([*base_args(case, output), "--method", "gradient_x_input"]) == cli.EXIT_ERROR
    assert "already holds SegExplain results" in capsys.readouterr().err
    assert (output / "summary.json").read_text() == first
    assert cli.main([*base_args(case, output), "--method", "gradient_x_input", "--overwrite"]) == 0
    assert json.loads((output / "summary.json").read_text())["method"] == "gradient_x_input"
    assert (output / cli.OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in case["dir"].iterdir() if p.name.startswith(".keep")) == []


def test_an_empty_folder_is_used_as_it_is(case):
    output = case["dir"] / "empty"
    output.mkdir()
    assert cli.main([*base_args(case, output), "--method", "gradient"]) == 0
    assert (output / "summary.json").is_file()


def test_overwrite_replaces_only_what_segexplain_wrote(case, capsys, monkeypatch):
    """A folder without SegExplain's marker is never replaced, not even with --overwrite: its files stay."""
    output = case["dir"] / "theirs"
    output.mkdir()
    (output / "mine.txt").write_text("precious")
    assert cli.main([*base_args(case, output), "--method", "gradient", "--overwrite"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: output folder '{re.escape(str(output))}' is not a SegExplain output folder "
                        rf"\(it has no {re.escape(cli.OUTPUT_MARKER)} file\).*even with --overwrite.*", err), err
    assert (output / "mine.txt").read_text() == "precious" and sorted(p.name for p in output.iterdir()) == ["mine.txt"]

    monkeypatch.chdir(output)  # --output . once emptied the working directory
    assert cli.main([*base_args(case, "."), "--method", "gradient", "--overwrite"]) == cli.EXIT_ERROR
    assert "is not a SegExplain output folder" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["mine.txt"]


def test_overwrite_never_replaces_a_file(case, capsys):
    output = case["dir"] / "notes.txt"
    output.write_text("precious")
    assert cli.main([*base_args(case, output), "--method", "gradient", "--overwrite"]) == cli.EXIT_ERROR
    assert f"output {str(output)!r} is a file, not a folder" in capsys.readouterr().err
    assert output.read_text() == "precious"


def test_a_failed_overwrite_leaves_the_old_results(case, capsys, monkeypatch):
    """The new results are written beside the old ones and swapped in at the end: a failure changes nothing."""
    output = case["dir"] / "swap"
    assert cli.main([*base_args(case, output), "--method", "gradient"]) == 0
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("SegExplainLib.models.protocol.explain", broken)
    assert cli.main([*base_args(case, output), "--overwrite"]) == cli.EXIT_ERROR
    assert "out of memory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before

    monkeypatch.undo()
    real_rename = type(output).rename

    def failing_move_in(self, target):  # the new folder cannot be moved in, after the old one was moved away
        if self.name.startswith(".swap.partial-"):
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(type(output), "rename", failing_move_in)
    assert cli.main([*base_args(case, output), "--method", "gradient_x_input", "--overwrite"]) == cli.EXIT_ERROR
    assert "disk went away" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in case["dir"].iterdir() if p.name.startswith(".swap")] == []


MODEL_FILE = """
from pathlib import Path

Path(__file__).with_name("ran.txt").write_text("the model file ran")

from SegExplainLib.models.networks import tiny_unet as Net
"""


def _card(case, model, **fields):
    (case["dir"] / "evil.py").write_text(MODEL_FILE)
    path = case["dir"] / "card.json"
    path.write_text(json.dumps({"model": model, "weights": case["weights"], "sequences": ["T2", "FLAIR"],
                                "classes": ["background", "lesion"], **fields}))
    return str(path)


def _without_model(args):
    index = args.index("--model")
    return args[:index] + args[index + 4:]  # --model SPEC --weights FILE


@pytest.mark.parametrize(("model", "fields"), [
    ("evil.py:Net", {}),
    ("evil.py:Net", {"trust_pickle": True}),  # a card cannot allow its own code
    ("os:system", {"kwargs": {"command": "touch touched"}}),
])
def test_a_model_card_alone_never_runs_code(case, capsys, monkeypatch, model, fields):
    monkeypatch.chdir(case["dir"])
    card = _card(case, model, **fields)
    output = case["dir"] / "card_out"
    assert cli.main([*_without_model(base_args(case, output)), "--card", card]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: model card '{re.escape(card)}' would run .*; pass --trust-model-code only if you "
                        rf"trust it \(a model card cannot allow this itself\)", err), err
    assert not (case["dir"] / "ran.txt").exists() and not (case["dir"] / "touched").exists()
    assert not output.exists()


def test_trust_model_code_runs_the_cards_model_file(case):
    card = _card(case, "evil.py:Net")
    output = case["dir"] / "trusted"
    args = [*_without_model(base_args(case, output)), "--card", card, "--method", "gradient"]
    assert cli.main([*args, "--trust-model-code"]) == 0
    assert (case["dir"] / "ran.txt").is_file() and (output / "summary.json").is_file()


def test_a_model_file_on_the_command_line_needs_the_flag_too(case, capsys):
    (case["dir"] / "evil.py").write_text(MODEL_FILE)
    args = base_args(case, case["dir"] / "direct")
    args[args.index("--model") + 1] = f"{case['dir'] / 'evil.py'}:Net"
    assert cli.main(args) == cli.EXIT_ERROR
    assert "would run the Python file" in capsys.readouterr().err and not (case["dir"] / "ran.txt").exists()


def test_no_model_is_an_error_naming_the_card_and_the_demo(case, capsys):
    """Six sequences once made a random reference U-Net 'explain' them, with exit status 0."""
    output = case["dir"] / "random"
    args = _without_model(base_args(case, output))
    args[args.index("--input") + 1:args.index("--input") + 3] = case["images"] * 3
    assert cli.main([*args, "--whole-class", "--method", "gradient"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model given: pass --card FILE") and f"--card {demo_card_path()}" in err, err
    assert not output.exists()


def test_review_refuses_a_card_that_runs_code_unless_trusted(case, capsys):
    card = _card(case, "evil.py:Net")
    assert cli.main(["review", str(case["dir"]), "--card", card]) == cli.EXIT_ERROR
    assert "would run the Python file" in capsys.readouterr().err and not (case["dir"] / "ran.txt").exists()


def test_interrupt_leaves_nothing_behind(case, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("SegExplainLib.models.protocol.explain", interrupted)
    output = case["dir"] / "interrupted"
    assert cli.main(base_args(case, output)) == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert not output.exists() and not list(case["dir"].glob(".interrupted.partial-*"))


def test_figures_are_written(case):
    output = case["dir"] / "figures"
    args = [a for a in base_args(case, output) if a != "--no-figures"]
    assert cli.main([*args, "--method", "gradient"]) == 0
    for name in ("mip.png", "montage.png", "shares.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_drawn_from_the_explanation(case, monkeypatch):
    """The case's figures know what they show: the record (method, region, class, score for the titles), the grid
    (orientation letters, mm) and the explained box, which the montage's slices go through."""
    from SegExplainLib.io import figures

    drawn = []
    real = figures.explanation_figures

    def spy(image, maps, **options):
        drawn.append(options)
        return real(image, maps, **options)

    monkeypatch.setattr(figures, "explanation_figures", spy)
    output = case["dir"] / "explained-figures"
    args = [a for a in base_args(case, output) if a != "--no-figures"]
    assert cli.main([*args, "--method", "gradient", "--box-index", "1", "2", "2", "4", "6", "7"]) == 0
    (options,) = drawn
    summary = json.loads((output / "summary.json").read_text())
    assert options["record"]["method"] == "gradient" and options["record"]["target"]["kind"] == "box"
    assert options["geometry"].to_dict() == summary["geometry"]
    box = np.zeros(SHAPE, bool)
    box[1:4, 2:6, 2:7] = True
    np.testing.assert_array_equal(options["region"], box)
    assert summary["figures"] == ["mip.png", "montage.png", "shares.png"]


def test_cohort_continues_after_a_failure_resumes_and_summarizes(case, capsys):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 3:5, 3:6] = 1
    truth = write_image(case["dir"] / "truth.nii.gz", labels)
    cases = case["dir"] / "cases.csv"
    inputs = ";".join(case["images"])
    cases.write_text("case,inputs,ground_truth\n"
                     f"a,{inputs},{truth.name}\n"
                     f"b,{case['images'][0]};missing.nii.gz,\n"
                     f"c,{inputs},{truth.name}\n")
    output = case["dir"] / "cohort"
    argv = ["cohort", "--cases", str(cases), "--output", str(output), "--",
            "--model", "SegExplainLib.models:tiny_unet", "--weights", case["weights"], "--whole-class",
            "--method", "gradient", "--no-figures", "--sequence-names", "T2", "FLAIR"]
    assert cli.main(argv) == cli.EXIT_CASES_FAILED
    failures = json.loads((output / "failures.json").read_text())
    assert list(failures) == ["b"] and "missing.nii.gz" in failures["b"]
    table = (output / "cohort.csv").read_text().splitlines()
    assert table[0] == "case,sequence,share_positive,share_negative,share_absolute,ground_truth_inclusivity"
    assert [line.split(",")[:2] for line in table[1:]] == [["a", "T2"], ["a", "FLAIR"], ["c", "T2"], ["c", "FLAIR"]]
    assert all(line.split(",")[5] for line in table[1:])  # inclusivity against the ground truth
    for name in ("shares_across_cases.png", "inclusivity.png"):
        assert (output / name).read_bytes()[:4] == b"\x89PNG"

    finished = (output / "cases" / "a" / "summary.json").stat().st_mtime_ns
    cases.write_text("case,inputs,ground_truth\n" f"a,{inputs},{truth.name}\n" f"c,{inputs},{truth.name}\n")
    assert cli.main(argv) == 0
    assert (output / "cases" / "a" / "summary.json").stat().st_mtime_ns == finished  # not recomputed
    assert json.loads((output / "failures.json").read_text()) == {}


def test_a_cohort_writes_each_cases_segment_matrix_but_not_on_ray_workers_yet(case, capsys):
    cases = case["dir"] / "cases.csv"
    cases.write_text(f"case,inputs\na,{';'.join(case['images'])}\n")
    output = case["dir"] / "cohort"
    argv = ["cohort", "--cases", str(cases), "--output", str(output), "--", "--model", "SegExplainLib.models:tiny_unet",
            "--weights", case["weights"], "--method", "gradient", "--no-figures", "--segment-matrix"]
    assert cli.main(argv) == 0
    assert (output / "cases" / "a" / "segment_matrix.csv").is_file()
    assert cli.main([*argv[:5], "--workers", "1", *argv[5:]]) == cli.EXIT_ERROR
    assert "--segment-matrix is computed by 'segexplain cohort' without --workers only" in capsys.readouterr().err


def test_cohort_output_is_marked_and_never_mixes_into_another_folder(case, capsys):
    cases = case["dir"] / "cases.csv"
    cases.write_text(f"case,inputs\na,{';'.join(case['images'])}\n")
    options = ["--", "--model", "SegExplainLib.models:tiny_unet", "--weights", case["weights"], "--whole-class",
               "--method", "gradient", "--no-figures"]
    theirs = case["dir"] / "theirs"
    theirs.mkdir()
    (theirs / "cohort.csv").write_text("precious")
    assert cli.main(["cohort", "--cases", str(cases), "--output", str(theirs), *options]) == cli.EXIT_ERROR
    assert "is not a SegExplain output folder" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["cohort.csv"]
    output = case["dir"] / "cohort"
    assert cli.main(["cohort", "--cases", str(cases), "--output", str(output), *options]) == 0
    assert (output / cli.OUTPUT_MARKER).is_file() and (output / "cases" / "a" / cli.OUTPUT_MARKER).is_file()
    assert cli.main(["cohort", "--cases", str(cases), "--output", str(output), *options]) == 0  # resumes


@pytest.mark.parametrize("name", ["..", "."])
def test_cohort_case_names_stay_inside_the_cohort(case, capsys, name):
    cases = case["dir"] / "cases.csv"
    cases.write_text(f"case,inputs\n{name},{';'.join(case['images'])}\n")
    assert cli.main(["cohort", "--cases", str(cases), "--output", str(case["dir"] / "c")]) == cli.EXIT_ERROR
    assert "case names" in capsys.readouterr().err


def test_cohort_rejects_a_bad_cases_file(case, capsys):
    bad = case["dir"] / "bad.csv"
    bad.write_text("name,files\nx,y\n")
    assert cli.main(["cohort", "--cases", str(bad), "--output", str(case["dir"] / "c")]) == cli.EXIT_ERROR
    assert "needs the columns 'case' and 'inputs'" in capsys.readouterr().err


def test_demo_command_runs_on_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo"]) == 0  # no arguments: writes ./segexplain-demo
    output = tmp_path / "segexplain-demo"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["normalized_input"] and summary["options"]["composite"] == "epsilon_plus"
    shares = summary["relevance_shares"]["positive"]
    assert len(shares) == 6 and max(shares.values()) > 2 * min(shares.values())
    assert set(summary["ground_truth_inclusivity"]) == set(shares)
    assert len(list(output.glob("relevance_*.nii.gz"))) == 6 and (output / "montage.png").exists()
    assert (output / cli.OUTPUT_MARKER).is_file()
    assert cli.main(["demo"]) == cli.EXIT_ERROR  # never overwrites the earlier results unasked


def test_patch_size_runs_the_network_by_windows(case):
    output = case["dir"] / "windows"
    assert cli.main([*base_args(case, output), "--patch-size", "4", "4", "6", "--method", "gradient"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sliding_window"] == {"patch_size": [4, 4, 6], "overlap": 0.5}


def test_cohort_from_a_folder_of_cases(case):
    import shutil

    root = case["dir"] / "folders"
    for name in ("p1", "p2"):
        folder = root / name
        folder.mkdir(parents=True)
        shutil.copy(case["images"][0], folder / "T2.nii.gz")
        shutil.copy(case["images"][1], folder / "FLAIR.nii.gz")
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 3:5, 3:6] = 1
    write_image(root / "p2" / "ground_truth.nii.gz", labels)
    output = case["dir"] / "folder_cohort"
    argv = ["cohort", "--cases", str(root), "--output", str(output), "--parquet", "--",
            "--model", "SegExplainLib.models:tiny_unet", "--weights", case["weights"], "--whole-class",
            "--method", "gradient", "--no-figures", "--sequence-names", "T2", "FLAIR"]
    assert cli.main(argv) == 0
    table = (output / "cohort.csv").read_text().splitlines()[1:]
    assert [line.split(",")[:2] for line in table] == [["p1", "T2"], ["p1", "FLAIR"], ["p2", "T2"], ["p2", "FLAIR"]]
    assert [bool(line.split(",")[5]) for line in table] == [False, False, True, True]
    summary = json.loads((output / "cases" / "p1" / "summary.json").read_text())
    assert [p.split("/")[-1] for p in summary["inputs"]] == ["T2.nii.gz", "FLAIR.nii.gz"]
    parquet = pytest.importorskip("pyarrow.parquet").read_table(output / "cohort.parquet").to_pylist()
    assert [(row["case"], row["sequence"]) for row in parquet] == [tuple(line.split(",")[:2]) for line in table]


def test_unexpected_failures_are_one_line_too(case, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full\nmore detail")

    monkeypatch.setattr("SegExplainLib.models.protocol.explain", broken)
    output = case["dir"] / "broken"
    assert cli.main(base_args(case, output)) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RuntimeError: disk full (SEGEXPLAIN_DEBUG=1 shows the traceback)"]
    assert not output.exists()
    monkeypatch.setenv("SEGEXPLAIN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(base_args(case, output))


@pytest.mark.parametrize(("where", "category", "shown"), [
    (("engine", "api.py"), UserWarning, True),  # SegExplain's own, raised below the front ends too
    (("io", "imaging", "reading.py"), UserWarning, True),
    (("frontends", "cli.py"), UserWarning, True),
    (("engine", "api.py"), DeprecationWarning, False),  # a deprecation notice is never the user's business
])
def test_own_warnings_are_those_of_the_whole_library(where, category, shown):
    import warnings

    import SegExplainLib

    path = Path(SegExplainLib.__file__).resolve().parent.joinpath(*where)
    message = warnings.WarningMessage("w", category, str(path), 1)
    assert cli._is_own(message) is shown
    assert not cli._is_own(warnings.WarningMessage("w", UserWarning, warnings.__file__, 1))


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The demo case's sequence files as a shell lists ``case_1000_*.nii.gz``: sorted by name, not the card's order."""
    from SegExplainLib.application.demo import write_demo_case

    paths, label = write_demo_case(tmp_path_factory.mktemp("demo_case"), 1000)
    return {"ordered": [str(p) for p in paths], "sorted": sorted(map(str, paths)), "label": str(label)}


def demo_args(inputs, output):
    return ["explain", "--input", *inputs, "--card", str(demo_card_path()), "--method", "gradient", "--device", "cpu",
            "--output", str(output), "--no-figures", "--progress", "none"]


def test_sequence_files_sorted_by_the_shell_go_to_their_sequences(demo_files, tmp_path, capsys):
    assert demo_files["sorted"] != demo_files["ordered"]
    assert cli.main(demo_args(demo_files["ordered"], tmp_path / "ordered")) == 0
    assert cli.main(demo_args(demo_files["sorted"], tmp_path / "sorted")) == 0
    err = capsys.readouterr().err
    assert "inputs put in the model's order by their names: case_1000_T2 -> T2, case_1000_T1 -> T1, " in err
    ordered, shuffled = (json.loads((tmp_path / k / "summary.json").read_text()) for k in ("ordered", "sorted"))
    assert shuffled["relevance_shares"] == ordered["relevance_shares"]
    assert shuffled["sequence_order"] == "matched by name"
    assert shuffled["sequence_inputs"] == {name: Path(p).name for name, p in zip(ordered["sequence_names"],
                                                                                  demo_files["ordered"])}
    for name in ordered["sequence_names"]:
        np.testing.assert_array_equal(*(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / k / f"relevance_{name}"
                                                                                    ".nii.gz")))
                                        for k in ("ordered", "sorted")))


def test_names_that_contradict_the_order_are_refused(demo_files, tmp_path, capsys):
    inputs = list(demo_files["ordered"])
    inputs[2], inputs[3] = inputs[3], tmp_path / "unnamed.nii.gz"  # T1-20s's place holds T1-60s; one name tells nothing
    Path(inputs[3]).write_bytes(Path(demo_files["ordered"][2]).read_bytes())
    assert cli.main(demo_args(map(str, inputs), tmp_path / "out")) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case_1000_T1-60s (given as T1-20s) contradict the order given" in err[0], err
    assert not (tmp_path / "out").exists()


def test_unnamed_files_keep_the_order_given_and_say_so(demo_files, tmp_path):
    inputs = []
    for index, path in enumerate(demo_files["ordered"]):
        inputs.append(tmp_path / f"scan{index}.nii.gz")
        inputs[-1].write_bytes(Path(path).read_bytes())
    assert cli.main(demo_args(map(str, inputs), tmp_path / "out")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sequence_order"] == "taken as given"
    assert list(summary["sequence_inputs"].values()) == [p.name for p in inputs]


def test_a_missing_sequence_file_names_the_models_sequences_and_the_matches(demo_files, tmp_path, capsys):
    assert cli.main(demo_args(demo_files["sorted"][:5], tmp_path / "out")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "5 inputs (case_1000_T1-120s, " in err and "the model's 6 sequences, in order: T2, T1, T1-20s, T1-60s, " \
        "T1-120s, T1-15min" in err and "matched: case_1000_T1-120s -> T1-120s" in err, err


@pytest.mark.parametrize(("composite", "warned"), [([], False), (["--composite", "epsilon_plus_flat"], True)])
def test_the_default_composite_gives_shares_without_a_warning(demo_files, tmp_path, capsys, composite, warned):
    args = demo_args(demo_files["ordered"], tmp_path / "out")
    args[args.index("gradient")] = "lrp"
    assert cli.main([*args, *composite]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert ("ignores the input values" in capsys.readouterr().err) is warned
    assert any("ignores the input values" in w for w in summary["warnings"]) is warned


def test_review_takes_the_card_as_explain_does(case, capsys):
    card = case["dir"] / "card.json"
    assert cli.main(["review", str(case["dir"]), "--model", str(card)]) == cli.EXIT_ERROR
    assert f"review takes a model card as --card {card} (as explain does)" in capsys.readouterr().err
    assert cli.main(["review", str(case["dir"]), "--card", str(card)]) == cli.EXIT_ERROR  # the same name as explain's
    assert f"model card {str(card)!r}" in capsys.readouterr().err


def test_cohort_cases_with_sorted_files_go_to_their_sequences(demo_files, tmp_path):
    (tmp_path / "cases.csv").write_text(f"case,inputs\nsorted,{';'.join(demo_files['sorted'])}\n"
                                        f"ordered,{';'.join(demo_files['ordered'])}\n")
    assert cli.main(["cohort", "--cases", str(tmp_path / "cases.csv"), "--output", str(tmp_path / "out"), "--",
                     "--card", str(demo_card_path()), "--method", "gradient", "--device", "cpu", "--no-figures"]) == 0
    ordered, shuffled = (json.loads((tmp_path / "out" / "cases" / k / "summary.json").read_text())
                         for k in ("ordered", "sorted"))
    assert shuffled["relevance_shares"] == ordered["relevance_shares"]
    assert shuffled["sequence_order"] == "matched by name"
