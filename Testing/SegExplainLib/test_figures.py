"""Tests of the figures: projections against numpy, rendered pixel colours at planted blobs, atomic saving."""

from __future__ import annotations

import dataclasses
import io
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from SegExplainLib.engine.metrics import relevance_shares
from SegExplainLib.engine.segments import SegmentMatrix
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures import (
    explanation_figures,
    inclusivity_figure,
    maximum_intensity_projection,
    mip_figure,
    montage_figure,
    montage_slices,
    rendered_montage,
    save_figure,
    segment_matrix_figure,
    shares_figure,
)
from SegExplainLib.io.figures.panels import letter_path
from SegExplainLib.io.figures.views import (
    case_slices,
    slice_label,
    slice_profile,
    slice_view_label,
    slice_view_letters,
    view_of,
)
from SegExplainLib.io.imaging import Geometry

NAMES = ["T1", "FLAIR"]
SHAPE = (2, 6, 16, 16)


def errors(message: str):
    return pytest.raises(SegExplainError, match=re.escape(message))


def render(fig: Figure) -> np.ndarray:
    """RGBA pixels (rows top to bottom) of the figure drawn on its Agg canvas, as int."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).astype(int)


def pixel(fig: Figure, pixels: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """RGB of the rendered pixel at data coordinates (x, y) of ``ax``."""
    display_x, display_y = ax.transData.transform((x, y))
    return pixels[int(pixels.shape[0] - display_y), int(display_x), :3]


def axes_by_label(fig: Figure, prefix: str) -> list:
    return [ax for ax in fig.axes if ax.get_label().startswith(prefix)]


def is_red(rgb: np.ndarray) -> bool:
    return rgb[0] - rgb[2] > 30 and rgb[0] - rgb[1] > 30


def is_blue(rgb: np.ndarray) -> bool:
    return rgb[2] - rgb[0] > 30


def is_grey(rgb: np.ndarray) -> bool:
    return int(rgb.max()) - int(rgb.min()) <= 3


@pytest.fixture
def planted(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grey image with noise; T1 has a positive blob at rows/cols 2..5 and a negative one at 10..13 (slices 1..2),
    FLAIR only a negative blob at rows/cols 2..5 (slice 4); weak noise elsewhere."""
    image = 0.5 + 0.1 * rng.standard_normal(SHAPE)
    maps = 0.001 * rng.standard_normal(SHAPE)
    maps[0, 1:3, 2:6, 2:6] = 2.0
    maps[0, 1:3, 10:14, 10:14] = -2.0
    maps[1, 4, 2:6, 2:6] = -0.5
    return image, maps


# ------------------------------------------------------------------------------------------------------------
# maximum_intensity_projection


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mip_matches_numpy_reference(rng, axis):
    volume = rng.standard_normal((5, 6, 7))
    unsigned = maximum_intensity_projection(volume, axis=axis, signed=False)
    np.testing.assert_array_equal(unsigned, volume.max(axis=axis))
    signed = maximum_intensity_projection(volume, axis=axis)
    moved = np.moveaxis(volume, axis, -1)
    reference = np.empty(moved.shape[:2])
    for i, j in np.ndindex(reference.shape):
        line = moved[i, j]
        reference[i, j] = line[np.argmax(np.abs(line))]
    np.testing.assert_array_equal(signed, reference)


def test_mip_keeps_sign_of_strongest_value():
    volume = np.zeros((4, 1, 3))
    volume[:, 0, 0] = [1.0, -5.0, 2.0, 0.5]  # the negative value dominates although the maximum is positive
    volume[:, 0, 1] = [0.1, 0.2, 3.0, -1.0]
    volume[:, 0, 2] = [-2.0, 2.0, 0.0, 0.0]  # tie: the first along the axis wins
    np.testing.assert_array_equal(maximum_intensity_projection(volume), [[-5.0, 3.0, -2.0]])
    np.testing.assert_array_equal(maximum_intensity_projection(volume, signed=False), [[2.0, 3.0, 2.0]])


def test_mip_accepts_tensor():
    volume = torch.tensor([[[1.0]], [[-3.0]]], dtype=torch.bfloat16)
    np.testing.assert_array_equal(maximum_intensity_projection(volume), [[-3.0]])


def test_mip_rejects_bad_input():
    with errors("axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got 3"):
        maximum_intensity_projection(np.zeros((2, 2, 2)), axis=3)
    with errors("axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got True"):
        maximum_intensity_projection(np.zeros((2, 2, 2)), axis=True)
    with errors("volume must be shaped (D, H, W), got shape (2, 2)"):
        maximum_intensity_projection(np.zeros((2, 2)))
    with errors("signed must be True or False, got 1"):
        maximum_intensity_projection(np.zeros((2, 2, 2)), signed=1)
    with errors("volume contains NaN or infinite values; expected finite numbers"):
        maximum_intensity_projection(np.full((2, 2, 2), np.nan))
    with errors("volume must hold real numbers, got dtype complex128"):
        maximum_intensity_projection(np.zeros((2, 2, 2), dtype=complex))


# ------------------------------------------------------------------------------------------------------------
# mip_figure


def test_mip_figure_overlays_red_and_blue_at_the_blobs(planted):
    image, maps = planted
    fig = mip_figure(image, maps, sequence_names=NAMES, title="case 7")
    pixels = render(fig)
    t1, flair = axes_by_label(fig, "image:")
    # imshow: pixel (row, col) is centred at data (x=col, y=row).
    assert is_red(pixel(fig, pixels, t1, 3.5, 3.5))
    assert is_blue(pixel(fig, pixels, t1, 11.5, 11.5))
    assert is_grey(pixel(fig, pixels, t1, 8, 1))  # no relevance: the grey image shows unchanged
    assert is_blue(pixel(fig, pixels, flair, 3.5, 3.5))
    assert is_grey(pixel(fig, pixels, flair, 11.5, 11.5))
    assert [ax.get_title() for ax in axes_by_label(fig, "image:")] == NAMES
    assert fig.get_suptitle() == "case 7"


def test_mip_figure_has_one_colour_bar_per_sequence_with_symmetric_limits(planted):
    image, maps = planted
    fig = mip_figure(image, maps, sequence_names=NAMES)
    bars = axes_by_label(fig, "colorbar:")
    assert [ax.get_label() for ax in bars] == ["colorbar:T1", "colorbar:FLAIR"]
    assert len(fig.axes) == 2 * len(NAMES)
    np.testing.assert_allclose([ax.get_ylim() for ax in bars], [(-2.0, 2.0), (-0.5, 0.5)])
    shared = mip_figure(image, maps, sequence_names=NAMES, shared_scale=True)
    np.testing.assert_allclose([ax.get_ylim() for ax in axes_by_label(shared, "colorbar:")], [(-2.0, 2.0)] * 2)


def test_mip_figure_along_other_axes_and_with_spacing(planted):
    image, maps = planted
    fig = mip_figure(image, torch.from_numpy(maps), sequence_names=NAMES, axis=1, spacing=(3.0, 1.0, 1.0))
    pixels = render(fig)
    t1 = axes_by_label(fig, "image:T1")[0]
    # axis=1 leaves (D, W): T1's blobs lie at slices 1..2, columns 2..5 (positive) and 10..13 (negative); the
    # positive and negative blobs do not overlap in W, so the MIP keeps both.
    assert is_red(pixel(fig, pixels, t1, 3.5, 1.5))
    assert is_blue(pixel(fig, pixels, t1, 11.5, 1.5))
    assert is_grey(pixel(fig, pixels, t1, 3.5, 4.0))
    # A slice is displayed three times as tall as a voxel is wide.
    (x0, y0), (x1, y1) = t1.transData.transform([(0, 0), (1, 1)])
    assert abs(y0 - y1) == pytest.approx(3 * abs(x1 - x0), rel=1e-6)


def test_mip_figure_of_an_all_zero_map_shows_only_grey(planted):
    image, _ = planted
    fig = mip_figure(image, np.zeros(SHAPE), sequence_names=NAMES, alpha=1.0)
    pixels = render(fig)
    for c, ax in enumerate(axes_by_label(fig, "image:")):
        grey = image[c].max(axis=0)
        expected = (grey - grey.min()) / (grey.max() - grey.min()) * 255  # the "gray" map, unchanged by an overlay
        for col, row in [(3, 3), (11, 11), (8, 1), (0, 15)]:
            rgb = pixel(fig, pixels, ax, col, row)
            assert is_grey(rgb)
            assert abs(rgb[0] - expected[row, col]) <= 2


def test_mip_figure_rejects_bad_input(planted):
    image, maps = planted
    with errors("image shape (1, 6, 16, 16) does not match maps shape (2, 6, 16, 16); expected the same (C, D, H, W)"):
        mip_figure(image[:1], maps, sequence_names=NAMES)
    with errors("maps must be shaped (C, D, H, W), got shape (6, 16, 16)"):
        mip_figure(image[0], maps[0], sequence_names=NAMES)
    with errors("sequence_names has 3 names for 2 sequences; expected one per channel"):
        mip_figure(image, maps, sequence_names=["a", "b", "c"])
    with errors("sequence_names must be a list of 2 strings, got 'T1'"):
        mip_figure(image, maps, sequence_names="T1")
    with errors("sequence_names must hold strings, got 2"):
        mip_figure(image, maps, sequence_names=["T1", 2])
    with errors("axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got -1"):
        mip_figure(image, maps, sequence_names=NAMES, axis=-1)
    with errors("alpha must be a number in [0, 1], got 1.5"):
        mip_figure(image, maps, sequence_names=NAMES, alpha=1.5)
    with errors("shared_scale must be True or False, got 'yes'"):
        mip_figure(image, maps, sequence_names=NAMES, shared_scale="yes")
    with errors("cmap must be the name of a matplotlib colour map such as 'RdBu_r', got 'nope'"):
        mip_figure(image, maps, sequence_names=NAMES, cmap="nope")
    with errors("spacing must be three positive voxel sizes (D, H, W), got (1.0, 0.0, 1.0)"):
        mip_figure(image, maps, sequence_names=NAMES, spacing=(1.0, 0.0, 1.0))
    with errors("title must be a string or None, got 3"):
        mip_figure(image, maps, sequence_names=NAMES, title=3)
    bad = maps.copy()
    bad[0, 0, 0, 0] = np.inf
    with errors("maps contains NaN or infinite values; expected finite numbers"):
        mip_figure(image, bad, sequence_names=NAMES)


# ------------------------------------------------------------------------------------------------------------
# montage_figure


def test_montage_slices_even_and_relevance(planted):
    _, maps = planted
    assert montage_slices(maps, slices=3) == [1, 3, 5]
    assert montage_slices(maps, slices=1) == [3]
    assert montage_slices(maps, slices=50) == list(range(6))  # more than the volume has: every slice
    assert montage_slices(maps, slices=2, placement="relevance") == [1, 2]
    assert montage_slices(maps, slices=4, axis=2, placement="relevance") == [2, 3, 4, 5]
    assert montage_slices(np.zeros((1, 20, 2, 2)), slices=4) == [2, 7, 12, 17]


def test_montage_figure_layout_and_overlay(planted):
    image, maps = planted
    fig = montage_figure(image, maps, sequence_names=NAMES, slices=3, title="montage")
    tiles = axes_by_label(fig, "image:")
    assert [ax.get_label() for ax in tiles] == [f"image:{n}:{i}" for n in NAMES for i in (1, 3, 5)]
    assert [ax.get_title() for ax in tiles[:3]] == ["D=1", "D=3", "D=5"]
    assert [tiles[0].get_ylabel(), tiles[3].get_ylabel()] == NAMES
    assert [ax.get_label() for ax in axes_by_label(fig, "colorbar:")] == ["colorbar:T1", "colorbar:FLAIR"]
    assert fig.get_suptitle() == "montage"
    pixels = render(fig)
    t1_slice1, t1_slice3, t1_slice5, _, _, flair_slice5 = tiles
    assert is_red(pixel(fig, pixels, t1_slice1, 3.5, 3.5))
    assert is_blue(pixel(fig, pixels, t1_slice1, 11.5, 11.5))
    assert is_grey(pixel(fig, pixels, t1_slice3, 3.5, 3.5))  # the blob ends at slice 2
    assert is_grey(pixel(fig, pixels, t1_slice5, 3.5, 3.5))
    assert is_grey(pixel(fig, pixels, flair_slice5, 3.5, 3.5))  # FLAIR's blob is at slice 4, not shown


def test_montage_figure_through_the_region_of_largest_relevance(planted):
    image, maps = planted
    fig = montage_figure(image, maps, sequence_names=NAMES, slices=1, placement="relevance")
    t1, flair = axes_by_label(fig, "image:")
    assert t1.get_label() == "image:T1:1"
    pixels = render(fig)
    assert is_red(pixel(fig, pixels, t1, 3.5, 3.5))
    # FLAIR alone: its only blob is at slice 4.
    fig = montage_figure(image[1:], maps[1:], sequence_names=["FLAIR"], slices=1, placement="relevance")
    (flair,) = axes_by_label(fig, "image:")
    assert flair.get_label() == "image:FLAIR:4"
    assert is_blue(pixel(fig, render(fig), flair, 3.5, 3.5))


def test_montage_figure_rejects_bad_input(planted):
    image, maps = planted
    with errors("slices must be an integer >= 1, got 0"):
        montage_figure(image, maps, sequence_names=NAMES, slices=0)
    with errors("slices must be an integer >= 1, got 2.5"):
        montage_figure(image, maps, sequence_names=NAMES, slices=2.5)
    with errors("placement must be one of 'even', 'relevance', got 'top'"):
        montage_figure(image, maps, sequence_names=NAMES, placement="top")
    with errors("axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got 4"):
        montage_figure(image, maps, sequence_names=NAMES, axis=4)
    with errors("image shape (2, 6, 16, 15) does not match maps shape (2, 6, 16, 16)"):
        montage_figure(image[..., :15], maps, sequence_names=NAMES)
    with errors("sequence_names has 1 names for 2 sequences; expected one per channel"):
        montage_figure(image, maps, sequence_names=["T1"])


# ------------------------------------------------------------------------------------------------------------
# shares_figure and inclusivity_figure


def test_shares_figure_bar_chart_for_one_case():
    shares = np.array([0.2, 0.7, 0.1])
    names = ["T1", "T2", "FLAIR"]
    fig = shares_figure(shares, sequence_names=names, title="case 3")
    (ax,) = fig.axes
    assert ax.get_label() == "shares" and ax.get_title() == "case 3"
    bars = [p for p in ax.patches if (p.get_gid() or "").startswith("share:")]
    assert [b.get_gid() for b in bars] == [f"share:{n}" for n in names]
    np.testing.assert_allclose([b.get_height() for b in bars], shares)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_ylabel() == "share of positive relevance"
    pixels = render(fig)
    assert is_red(pixel(fig, pixels, ax, 2, 0.35))  # inside the T2 bar
    assert not is_red(pixel(fig, pixels, ax, 3, 0.35))  # above the FLAIR bar
    negative = shares_figure(shares, sequence_names=names, kind="negative")
    assert is_blue(pixel(negative, render(negative), negative.axes[0], 2, 0.35))


def test_shares_figure_distribution_over_cases(rng):
    shares = rng.dirichlet([1.0, 2.0, 4.0], size=20)
    names = ["T1", "T2", "FLAIR"]
    fig = shares_figure(torch.from_numpy(shares), sequence_names=names)
    (ax,) = fig.axes
    medians = [line for line in ax.lines if (line.get_gid() or "").startswith("median:")]
    assert [m.get_gid() for m in medians] == [f"median:{n}" for n in names]
    np.testing.assert_allclose([m.get_ydata()[0] for m in medians], np.median(shares, axis=0))
    assert [len(c.get_offsets()) for c in ax.collections] == [20, 20, 20]  # one point per case
    assert ax.get_xlabel() == "20 cases"
    pixels = render(fig)
    # The median line is black; the box beside it is filled in light red.
    assert pixel(fig, pixels, ax, 3.25, np.median(shares[:, 2])).max() < 60
    q1, q3 = np.percentile(shares[:, 2], [25, 75])
    inside = pixel(fig, pixels, ax, 3.25, q1 + 0.1 * (q3 - q1))
    assert inside[0] - inside[2] > 30


def test_shares_figure_rejects_bad_input():
    with errors("shares shape (0,) is empty; expected at least one case and one sequence"):
        shares_figure(np.array([]), sequence_names=[])
    with errors("shares shape (0, 3) is empty; expected at least one case and one sequence"):
        shares_figure(np.zeros((0, 3)), sequence_names=["a", "b", "c"])
    with errors("shares must be shaped (C,) or (n_cases, C), got shape (2, 2, 2)"):
        shares_figure(np.zeros((2, 2, 2)), sequence_names=["a", "b"])
    with errors("sequence_names has 2 names for 3 sequences; expected one per channel"):
        shares_figure(np.ones(3) / 3, sequence_names=["a", "b"])
    with errors("kind must be one of 'positive', 'negative', 'absolute', got 'signed'"):
        shares_figure(np.ones(3) / 3, sequence_names=["a", "b", "c"], kind="signed")
    with errors("shares contains NaN or infinite values; expected finite numbers"):
        shares_figure(np.array([np.nan, 1.0]), sequence_names=["a", "b"])


def test_inclusivity_figure_boxes_over_filters(rng):
    values = {
        "none": rng.uniform(0.2, 0.4, 12),
        "pass:0.4": rng.uniform(0.6, 0.9, 12),
        "clamp:0.2": rng.uniform(size=9),
    }
    fig = inclusivity_figure(values, title="Tjoa fig. 4")
    (ax,) = fig.axes
    assert ax.get_label() == "inclusivity" and ax.get_title() == "Tjoa fig. 4" and ax.get_ylabel() == "inclusivity"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
    medians = [line for line in ax.lines if (line.get_gid() or "").startswith("median:")]
    assert [m.get_gid() for m in medians] == [f"median:{k}" for k in values]
    np.testing.assert_allclose([m.get_ydata()[0] for m in medians], [np.median(v) for v in values.values()])
    pixels = render(fig)
    for x, v in enumerate(values.values(), start=1):
        assert pixel(fig, pixels, ax, x + 0.25, np.median(v)).max() < 60  # the median line is drawn there
    # Far below the first box there is only background.
    assert (pixel(fig, pixels, ax, 2.25, 0.5) > 240).all()


def test_inclusivity_figure_rejects_bad_input():
    with errors("values is empty; expected at least one filter label with its per-case values"):
        inclusivity_figure({})
    with errors("values must map filter labels to arrays of per-case values, got list"):
        inclusivity_figure([[0.1, 0.2]])
    with errors("values keys must be filter labels (strings), got 0.4"):
        inclusivity_figure({0.4: [0.1]})
    with errors("values['pass:0.4'] must be a non-empty 1-D array of per-case values, got shape (0,)"):
        inclusivity_figure({"pass:0.4": []})
    with errors("values['pass:0.4'] must be a non-empty 1-D array of per-case values, got shape (2, 2)"):
        inclusivity_figure({"pass:0.4": np.zeros((2, 2))})
    with errors("values['none'] contains NaN or infinite values; expected finite numbers"):
        inclusivity_figure({"none": [0.1, np.nan]})


# ------------------------------------------------------------------------------------------------------------
# save_figure


def test_save_figure_writes_png_atomically(tmp_path, planted):
    image, maps = planted
    fig = mip_figure(image, maps, sequence_names=NAMES)
    target = tmp_path / "mip.PNG"
    target.write_bytes(b"old")  # replaced as a whole
    assert save_figure(fig, target, dpi=50) == target
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    read_back = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert read_back.shape[:2] == (round(fig.get_figheight() * 50), round(fig.get_figwidth() * 50))
    # The saved picture holds the overlay: strongly red and strongly blue pixels are present.
    rgb = (read_back[..., :3] * 255).astype(int)
    assert ((rgb[..., 0] - rgb[..., 2]) > 60).any() and ((rgb[..., 2] - rgb[..., 0]) > 60).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mip.PNG"]
    assert fig.axes == []  # closed (cleared)


def test_save_figure_writes_pdf_and_can_keep_the_figure(tmp_path):
    fig = shares_figure(np.array([0.5, 0.5]), sequence_names=NAMES)
    path = save_figure(fig, str(tmp_path / "shares.pdf"), close=False)
    assert Path(path).read_bytes()[:4] == b"%PDF"
    assert len(fig.axes) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shares.pdf"]


def test_save_figure_removes_the_temporary_file_when_writing_fails(tmp_path):
    fig = Figure()
    ax = fig.add_subplot()
    ax.set_title("$\\notacommand$")  # mathtext error while rendering
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "broken.png")
    assert list(tmp_path.iterdir()) == []


def test_save_figure_rejects_bad_input(tmp_path):
    fig = Figure()
    with errors(f"path {str(tmp_path / 'a.jpg')!r} has suffix '.jpg'; expected .png or .pdf"):
        save_figure(fig, tmp_path / "a.jpg")
    with errors(f"folder {str(tmp_path / 'missing')!r} of path {str(tmp_path / 'missing' / 'a.png')!r} does not exist"):
        save_figure(fig, tmp_path / "missing" / "a.png")
    (tmp_path / "dir.png").mkdir()
    with errors(f"path {str(tmp_path / 'dir.png')!r} is a folder; expected a file path ending in .png or .pdf"):
        save_figure(fig, tmp_path / "dir.png")
    with errors("dpi must be a positive number, got 0"):
        save_figure(fig, tmp_path / "a.png", dpi=0)
    with errors("fig must be a matplotlib Figure, got ndarray"):
        save_figure(np.zeros((2, 2)), tmp_path / "a.png")
    with errors("path must be a file path ending in .png or .pdf, got 3"):
        save_figure(fig, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"]


def test_figures_are_made_and_saved_in_threads_without_pyplot(tmp_path, planted):
    image, maps = planted

    def job(i: int) -> bytes:
        fig = mip_figure(image, maps * (i + 1), sequence_names=NAMES)
        return save_figure(fig, tmp_path / f"mip{i}.png", dpi=40).read_bytes()

    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(job, range(4)))
    pictures = [matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3] for data in outputs]
    assert len({p.shape for p in pictures}) == 1
    for picture in pictures:  # each thread's picture is complete: both blobs are drawn
        rgb = (picture * 255).astype(int)
        assert ((rgb[..., 0] - rgb[..., 2]) > 60).any() and ((rgb[..., 2] - rgb[..., 0]) > 60).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mip{i}.png" for i in range(4)]


# ------------------------------------------------------------------------------------------------------------
# explanation_figures: what a reader needs (issue 19)

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
RECORD = {"method": "lrp", "options": {"composite": "epsilon_plus_flat"},
          "target": {"kind": "box", "class_index": 2, "aggregation": "sum", "start": [8, 2, 2], "stop": [12, 10, 10]},
          "target_score": 41.5}


def grid(direction=IDENTITY, shape=(24, 16, 16), spacing=(1.0, 1.0, 3.0), origin=(10.0, 20.0, -30.0)) -> Geometry:
    return Geometry(spacing, origin, direction, shape[::-1])


def case(rng: np.random.Generator, shape=(2, 24, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """Image with noise; weak relevance everywhere, a strong positive blob in slices 9..11 (rows and columns 11..13,
    the patient's posterior left on the identity grid) of every sequence, three times stronger in the second."""
    image = 0.5 + 0.1 * rng.standard_normal(shape)
    maps = 0.001 * rng.standard_normal(shape)
    maps[:, 9:12, 11:14, 11:14] = 1.0
    maps[1] *= 3.0
    return image, maps


def letters_drawn(fig: Figure) -> list[str]:
    """The letters of the figure's letter collection, read back from their outlines."""
    (collection,) = [a for a in fig.artists if a.get_gid() == "letters"]
    known = {letter: letter_path(letter).vertices for letter in "RLAPSI"}
    return [next(k for k, v in known.items() if v.shape == p.vertices.shape and np.allclose(v, p.vertices))
            for p in collection.get_paths()]


def text_by_gid(fig: Figure, gid: str) -> str:
    (text,) = [t for t in fig.texts if t.get_gid() == gid]
    return text.get_text()


def title_of(fig: Figure) -> str:
    """The figure's title with its lines joined, as a reader reads it."""
    return " ".join(text_by_gid(fig, "title").split())


def redness_by_panel(fig: Figure) -> list[int]:
    """The largest red minus green of the rendered pixels of each sequence's view of a MIP figure of T1 and FLAIR."""
    pixels = render(fig)
    centres = [fig.transFigure.transform(t.get_position())[0] for n in NAMES for t in fig.texts
               if t.get_gid() == f"name:{n}"]
    middle, end = (centres[0] + centres[1]) / 2, centres[1] + (centres[1] - centres[0]) / 2
    redness = pixels[..., 0] - pixels[..., 1]  # not minus blue: the yellow orientation letters would count
    return [int(redness[:, : int(middle)].max()), int(redness[:, int(middle): int(end)].max())]


def test_views_turn_slices_to_the_radiological_convention():
    axial = view_of(grid(), 0)
    assert axial.letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"} and axial.through == "S-I"
    assert not (axial.transpose or axial.flip_rows or axial.flip_cols)
    # x and y stored the other way round (a NIfTI in RAS order): the patient's left still shows on the right.
    flipped = view_of(grid((-1, 0, 0, 0, -1, 0, 0, 0, 1)), 0)
    assert flipped.letters == axial.letters and flipped.flip_rows and flipped.flip_cols
    plane = np.zeros((16, 16))
    plane[0, 0] = 1.0  # voxel (x, y) = (0, 0): the most left and posterior one of this grid
    assert flipped.show(plane)[-1, -1] == 1.0
    # Index x runs to S, y to L, z to A: slicing z cuts A-P, a coronal view (R-L across, S at the top).
    coronal = view_of(grid((0, 1, 0, 0, 0, 1, 1, 0, 0)), 0)
    assert coronal.letters == {"left": "R", "right": "L", "top": "S", "bottom": "I"} and coronal.through == "A-P"
    assert coronal.transpose and coronal.flip_rows and not coronal.flip_cols
    # Oblique by 20 degrees about the z axis: named by each axis' largest component.
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    assert view_of(grid((c, -s, 0, s, c, 0, 0, 0, 1)), 0).letters == axial.letters
    sagittal = view_of(grid(), 2)
    assert sagittal.letters == {"left": "A", "right": "P", "top": "S", "bottom": "I"} and sagittal.through == "R-L"


def test_slice_label_is_the_ras_position_in_mm():
    assert slice_label(grid(), 0, 4) == "S: -18.0 mm"  # LPS z = -30 + 4 * 3
    assert slice_label(grid((1, 0, 0, 0, 1, 0, 0, 0, -1)), 0, 4) == "S: -42.0 mm"
    assert slice_label(grid(), 2, 5) == "R: -15.0 mm"  # LPS x = 10 + 5: RAS x = -15


def test_slice_view_letters_and_label_follow_the_slice_to_ras_matrix():
    """Slicer's axial, coronal and sagittal presets (columns: screen right, up, normal in RAS; a slice offset)."""
    axial = np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -12.04], [0, 0, 0, 1]], float)
    coronal = np.array([[-1, 0, 0, 0], [0, 0, 1, 7.5], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    sagittal = np.array([[0, 0, 1, 3.0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert slice_view_letters(axial) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert slice_view_letters(coronal) == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert slice_view_letters(sagittal) == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    assert [slice_view_label(m) for m in (axial, coronal, sagittal)] == ["S: -12.0 mm", "A: 7.5 mm", "R: 3.0 mm"]
    flipped = axial @ np.diag([-1.0, -1.0, 1.0, 1.0])  # the same slice turned by 180 degrees
    assert slice_view_letters(flipped) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}


def test_rendered_montage_lays_out_views_drawn_elsewhere(rng):
    """Views drawn elsewhere keep their pixels, get their captions and letters, the title and a labelled bar."""
    tiles = [rng.integers(0, 256, (30, 40, 4), dtype=np.uint8) for _ in range(3)]
    letters = [{"left": "R", "right": "L", "top": "A", "bottom": "P"}] * 3
    fig = rendered_montage(tiles, captions=["S: 1.0 mm", "S: 2.0 mm", "S: 3.0 mm"], letters=letters, record=RECORD,
                           sequence_name="T2", limit=0.25, cmap=matplotlib.colormaps["RdBu_r"], columns=2)
    assert title_of(fig).startswith("lrp (composite epsilon_plus_flat) | box [8:12, 2:10, 2:10], class 2")
    assert "One colour scale for all sequences: ±0.25" in text_by_gid(fig, "name:T2")
    assert [text_by_gid(fig, f"slice:{i}") for i in range(3)] == ["S: 1.0 mm", "S: 2.0 mm", "S: 3.0 mm"]
    assert letters_drawn(fig) == ["R", "L", "A", "P"] * 3
    (bar,) = axes_by_label(fig, "colorbar")
    np.testing.assert_allclose(bar.get_ylim(), (-0.25, 0.25))
    assert bar.get_ylabel() == "relevance\nred: for, blue: against class 2"
    sheet = [a for a in fig.artists if a.get_gid() == "sheet"][0].rgba
    for tile in tiles:  # each view pasted as it is
        corners = np.argwhere((sheet[..., :3] == tile[0, 0, :3]).all(axis=-1))
        assert any(np.array_equal(sheet[r:r + 30, c:c + 40, :3], tile[..., :3]) for r, c in corners)
    options = {"captions": ["a"], "letters": letters[:1], "record": RECORD, "sequence_name": "T2", "limit": 1.0,
               "cmap": matplotlib.colormaps["RdBu_r"]}
    with errors("tiles must be uint8 RGB or RGBA images of one size, got shapes [(30, 40, 4), (31, 40, 4)]"):
        rendered_montage([tiles[0], np.zeros((31, 40, 4), np.uint8)], **{**options, "captions": ["a", "b"],
                                                                         "letters": letters[:2]})
    with errors("captions and letters must be one per tile (1), got 2 and 1"):
        rendered_montage(tiles[:1], **{**options, "captions": ["a", "b"]})
    with errors("limit must be a positive number, got 0.0"):
        rendered_montage(tiles[:1], **{**options, "limit": 0.0})
    with errors("cmap must be a matplotlib Colormap, got 'RdBu_r'"):
        rendered_montage(tiles[:1], **{**options, "cmap": "RdBu_r"})


def test_case_slices_go_through_the_region_and_the_relevance(rng):
    _, maps = case(rng)
    profile = slice_profile(np.abs(maps).sum(axis=0), 0)
    assert case_slices(profile, None, axis=0, count=6) == [9, 10, 11]  # weak noise elsewhere does not widen them
    region = np.zeros((24, 16, 16), bool)
    region[3:6, 2:5, 2:5] = True
    chosen = case_slices(profile, region, axis=0, count=4)
    peak = int(np.argmax(profile))
    assert len(chosen) == 4 and chosen[0] == 3 and chosen[-1] <= 11 and peak in chosen
    assert 20 in case_slices(np.eye(24)[20], region, axis=0, count=3)  # all relevance in one slice outside the region


def test_explanation_figures_share_one_scale_and_say_what_they_show(rng):
    image, maps = case(rng)
    figures = explanation_figures(image, maps, sequence_names=NAMES, geometry=grid(), record=RECORD)
    assert list(figures) == ["mip.png", "montage.png", "shares.png"]
    for filename in ("mip.png", "montage.png"):
        fig = figures[filename]
        (bar,) = axes_by_label(fig, "colorbar")
        np.testing.assert_allclose(bar.get_ylim(), (-3.0, 3.0))  # the largest |R| of both sequences
        assert bar.get_ylabel() == "relevance\nred: for, blue: against class 2"
        title = title_of(fig)
        assert title.startswith("lrp (composite epsilon_plus_flat) | box [8:12, 2:10, 2:10], class 2 | target "
                                 "score 41.5")
        assert "One colour scale for all sequences: ±3" in title
        assert "negative" not in title
    # On one scale FLAIR's blob (3.0) is a deeper red than T1's (1.0), as its relevance is larger.
    t1, flair = redness_by_panel(figures["mip.png"])
    assert flair > t1 + 30
    shares = figures["shares.png"]
    (ax,) = axes_by_label(shares, "shares")
    for kind in ("positive", "negative"):
        bars = [p for p in ax.patches if (p.get_gid() or "").startswith(f"share:{kind}:")]
        assert [b.get_gid() for b in bars] == [f"share:{kind}:{n}" for n in NAMES]
        np.testing.assert_allclose([b.get_height() for b in bars], 100 * relevance_shares(maps, kind=kind))


def test_explanation_figures_per_panel_scale_only_on_request_and_said(rng):
    image, maps = case(rng)
    figures = explanation_figures(image, maps, sequence_names=NAMES, geometry=grid(), record=RECORD,
                                  per_panel_scale=True)
    mip = figures["mip.png"]
    (bar,) = axes_by_label(mip, "colorbar")
    np.testing.assert_allclose(bar.get_ylim(), (-1.0, 1.0))
    assert "Colour scale per sequence" in title_of(mip)
    assert [text_by_gid(mip, f"name:{n}") for n in NAMES] == ["T1 (±1)", "FLAIR (±3)"]
    t1, flair = redness_by_panel(mip)
    assert abs(flair - t1) <= 2  # each at its own limit: the same red


def test_explanation_figures_montage_in_mm_with_orientation_letters(rng):
    image, maps = case(rng)
    region = np.zeros((24, 16, 16), bool)
    region[7:12, 10:14, 10:14] = True
    montage = explanation_figures(image, maps, sequence_names=NAMES, geometry=grid(), record=RECORD,
                                  region=region)["montage.png"]
    columns = case_slices(slice_profile(np.abs(maps).sum(axis=0), 0), region, axis=0, count=6)
    assert columns[0] == 7 and columns[-1] == 11
    labels = {t.get_gid(): t.get_text() for t in montage.texts if (t.get_gid() or "").startswith("slice:")}
    assert labels == {f"slice:{i}": f"S: {-30 + 3 * i:.1f} mm" for i in columns}
    assert letters_drawn(montage) == ["R", "L", "A", "P"] * (len(columns) * len(NAMES))
    coronal = explanation_figures(image, maps, sequence_names=NAMES, geometry=grid((0, 1, 0, 0, 0, 1, 1, 0, 0)),
                                  record=RECORD)
    assert letters_drawn(coronal["mip.png"]) == ["R", "L", "S", "I"] * len(NAMES)


@pytest.mark.parametrize(("direction", "side"), [(IDENTITY, "right"), ((-1, 0, 0, 0, -1, 0, 0, 0, 1), "left")])
def test_explanation_figures_show_the_patients_left_on_the_right(rng, direction, side):
    image, maps = case(rng)
    # The blob lies at high x indices: the patient's left on the identity grid, the right when x runs to R.
    mip = explanation_figures(image[:1], maps[:1], sequence_names=["T1"], geometry=grid(direction),
                              record=RECORD)["mip.png"]
    pixels = render(mip)
    centre, _ = mip.transFigure.transform(mip.texts[[t.get_gid() for t in mip.texts].index("name:T1")]
                                          .get_position())
    bar_left = axes_by_label(mip, "colorbar")[0].get_window_extent().x0
    red = np.nonzero((pixels[..., 0] - pixels[..., 2] > 40) & (pixels[..., 0] - pixels[..., 1] > 40))
    red = (red[0][red[1] < bar_left], red[1][red[1] < bar_left])  # the colour bar's red end left out
    assert red[1].size > 0
    assert (red[1].mean() > centre) == (side == "right")


@pytest.mark.parametrize(("score", "said"), [(-3596.0, "The target score is negative"),
                                             (0.0, "The target score is zero")])
def test_explanation_figures_say_a_target_score_that_is_not_positive(rng, score, said):
    image, maps = case(rng)
    figures = explanation_figures(image, maps, sequence_names=NAMES, geometry=grid(),
                                  record={**RECORD, "target_score": score})
    for fig in figures.values():
        title = title_of(fig)
        assert f"target score {score:.4g}" in title and said in title


def test_explanation_figures_rejects_bad_input(rng):
    image, maps = case(rng)
    options = {"sequence_names": NAMES, "geometry": grid(), "record": RECORD}
    with errors("record lacks 'target_score'; expected Explanation.record()"):
        explanation_figures(image, maps, **{**options, "record": {k: v for k, v in RECORD.items()
                                                                  if k != "target_score"}})
    with errors("record['target_score'] must be a finite number, got nan"):
        explanation_figures(image, maps, **{**options, "record": {**RECORD, "target_score": float("nan")}})
    with errors("maps shape (2, 24, 16, 16) does not match the geometry's (D, H, W) (24, 16, 8)"):
        explanation_figures(image, maps, **{**options, "geometry": grid(shape=(24, 16, 8))})
    with errors("region must be a non-empty boolean mask shaped (24, 16, 16) (the maps' grid), got dtype bool "
                "shape (24, 16, 16)"):
        explanation_figures(image, maps, **options, region=np.zeros((24, 16, 16), bool))
    with errors("per_panel_scale must be True or False, got 1"):
        explanation_figures(image, maps, **options, per_panel_scale=1)
    with errors("geometry must be a Geometry (from read_sequences), got tuple"):
        explanation_figures(image, maps, **{**options, "geometry": (1.0, 1.0, 3.0)})


def test_explanation_figures_save_at_any_resolution_and_as_pdf(rng, tmp_path):
    image, maps = case(rng)
    figures = explanation_figures(image, maps, sequence_names=NAMES, geometry=grid(), record=RECORD)
    width, height = (round(v * 120) for v in figures["mip.png"].get_size_inches())
    pictures = {}
    for dpi in (120, 60):
        data = save_figure(figures["mip.png"], tmp_path / f"mip{dpi}.png", dpi=dpi, close=False).read_bytes()
        pictures[dpi] = (matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3] * 255).astype(int)
    assert pictures[120].shape[:2] == (height, width) and pictures[60].shape[:2] == (height // 2, width // 2)
    bar_left = axes_by_label(figures["mip.png"], "colorbar")[0].get_position().x0  # its red end left out
    where = []
    for picture in pictures.values():  # the sheet's pixels are scaled with the figure: the blobs lie where they did
        views = picture[:, : int(bar_left * picture.shape[1])]
        rows, cols = np.nonzero((views[..., 0] - views[..., 1] > 40) & (views[..., 0] - views[..., 2] > 30))
        assert rows.size > 0
        where.append((rows.mean() / picture.shape[0], cols.mean() / picture.shape[1]))
    np.testing.assert_allclose(where[0], where[1], atol=0.02)
    pdf = save_figure(figures["montage.png"], tmp_path / "montage.pdf").read_bytes()
    montage_width = round(figures["montage.png"].get_figwidth() * 120)
    assert pdf[:4] == b"%PDF" and f"/Subtype /Image /Width {montage_width} ".encode() in pdf


def test_explanation_figures_keep_every_label_inside_the_figure_and_clear_of_the_views(rng):
    """The colour bar's two-line label stays on the figure and a sequence name such as T1-15min ends before the
    first view of its row (both were cut or covered in the demo's montage)."""
    names = ["T2", "T1-15min"]
    image, maps = case(rng)
    for filename in ("mip.png", "montage.png"):
        fig = explanation_figures(image, maps, sequence_names=names, geometry=grid(), record=RECORD)[filename]
        render(fig)  # lays the texts out
        renderer = fig.canvas.get_renderer()
        (bar,) = axes_by_label(fig, "colorbar")
        label = bar.yaxis.label.get_window_extent(renderer)
        assert fig.bbox.x0 <= label.x0 and label.x1 <= fig.bbox.x1, (filename, label.x1, fig.bbox.x1)
    (name,) = [t.get_window_extent(renderer) for t in fig.texts if t.get_gid() == "name:T1-15min"]
    (sheet,) = [a for a in fig.artists if a.get_gid() == "sheet"]
    row = sheet.rgba[int(fig.bbox.y1 - (name.y0 + name.y1) / 2), :, :3]  # the views, without the texts
    first_view = int(np.argmax(row.min(axis=1) < 250))
    assert name.x1 < first_view, (name.x1, first_view)


def _matrix(shares: list[list[float]], status: list[str]) -> SegmentMatrix:
    shares = np.asarray(shares, float)
    return SegmentMatrix(
        rows=["background", "liver", "kidney"], row_classes=[0, 1, 2], columns=["background", "liver", "kidney"],
        column_labels=[0, 1, 2], shares=shares, positive=np.nan_to_num(shares), negative=np.zeros_like(shares),
        status=status, method="lrp", options={"composite": "epsilon_plus"}, segmentation="predicted",
        explanations=[None] * 3, passes=1, seconds=0.1, case="case_007")


def test_segment_matrix_figure_writes_each_share_in_its_cell_and_greys_a_row_not_predicted():
    matrix = _matrix([[0.9, 0.1, 0.0], [0.05, 0.95, 0.0], [np.nan] * 3], ["explained", "explained", "not predicted"])
    fig = segment_matrix_figure(matrix)
    (ax,) = axes_by_label(fig, "segment_matrix")
    cells = {t.get_gid(): t.get_text() for t in ax.texts}
    assert cells["cell:liver:liver"] == "95 %" and cells["cell:background:kidney"] == "0 %"
    assert "not predicted" in [cells[f"cell:kidney:{c}"] for c in matrix.columns]
    assert [t.get_text() for t in ax.get_yticklabels()] == matrix.rows
    assert [t.get_text() for t in ax.get_xticklabels()] == matrix.columns
    title = fig._suptitle.get_text()
    assert "lrp (epsilon_plus), case case_007" in title and "rows sum to 100 %" in title
    (bar,) = axes_by_label(fig, "colorbar:segment_matrix")
    assert bar.get_ylabel() == "share of the row's positive relevance (%)" and bar.get_ylim() == (0.0, 100.0)
    pixels = render(fig)
    assert is_red(pixel(fig, pixels, ax, 1, 1)) and not is_red(pixel(fig, pixels, ax, 2, 1))
    assert is_grey(pixel(fig, pixels, ax, 0, 2))


def test_segment_matrix_figure_of_two_classes_has_room_for_its_title_and_colour_bar_label():
    matrix = _matrix([[0.97, 0.03, 0.0], [0.25, 0.75, 0.0], [np.nan] * 3], ["explained"] * 2 + ["not predicted"])
    matrix = dataclasses.replace(matrix, rows=matrix.rows[:2], columns=matrix.columns[:2], shares=matrix.shares[:2, :2],
                                 status=matrix.status[:2], case="case_1000_T2.nii.gz")
    fig = segment_matrix_figure(matrix)
    render(fig)
    renderer = fig.canvas.get_renderer()
    (bar,) = axes_by_label(fig, "colorbar:segment_matrix")
    for text in (fig._suptitle, bar.yaxis.label):
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, text


def test_segment_matrix_figure_rejects_what_is_no_matrix():
    with pytest.raises(SegExplainError, match="matrix must be a SegmentMatrix, got dict"):
        segment_matrix_figure({"shares": [[1.0]]})
