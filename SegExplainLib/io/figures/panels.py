"""Figures drawn as one picture: overlays coloured and scaled in numpy, laid out in pixels, shown by one image.

Matplotlib spends its time on axes, their layout and resampling many small images; a case figure needs none of
that. A :class:`Sheet` holds the whole picture as RGBA pixels plus its texts, letters and colour bar, and becomes a
figure whose pixels the renderer gets as they are, with no layout engine and one colour bar axes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.path import Path
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

# The sheet's pixels are the saved PNG's pixels at save_figure's default resolution.
DPI = 120
LETTER_POINTS = 7


@functools.cache
def letter_path(letter: str) -> Path:
    """The outline of a bold letter, ``LETTER_POINTS`` high in points, centred on (0, 0)."""
    path = TextPath((0, 0), letter, size=LETTER_POINTS, prop=FontProperties(weight="bold"))
    (x0, y0), (x1, y1) = path.get_extents().get_points()
    return path.transformed(Affine2D().translate(-(x0 + x1) / 2, -(y0 + y1) / 2))


def colour_table(cmap: matplotlib.colors.Colormap) -> np.ndarray:
    """The colour map as 256 RGB rows in [0, 1]; row 0 is ``-limit``, row 255 ``+limit``."""
    return cmap(np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)


def overlay_pixels(grey: np.ndarray, relevance: np.ndarray, *, grey_range: tuple[float, float], limit: float,
                   table: np.ndarray, alpha: float) -> np.ndarray:
    """RGB bytes of a grey plane with the relevance over it; the overlay's opacity is ``alpha * |R| / limit``."""
    low, high = grey_range
    shade = np.clip((grey.astype(np.float32) - low) / (high - low), 0.0, 1.0)[..., None]
    scaled = np.clip(relevance.astype(np.float32) / limit, -1.0, 1.0)
    colour = table[np.rint((scaled + 1.0) * 127.5).astype(np.intp)]
    opacity = (alpha * np.abs(scaled))[..., None]
    return np.rint(255.0 * (shade * (1.0 - opacity) + colour * opacity)).astype(np.uint8)


def resample(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """``plane`` resized to ``height x width`` pixels by nearest neighbour (leading axes of the plane)."""
    rows = (np.arange(height) + 0.5) * plane.shape[0] / height
    cols = (np.arange(width) + 0.5) * plane.shape[1] / width
    return plane[rows.astype(np.intp)][:, cols.astype(np.intp)]


def tile_size(shape: tuple[int, int], pixel_mm: tuple[float, float], longest: int) -> tuple[int, int]:
    """Height and width in pixels of a plane of ``shape`` voxels of ``pixel_mm``, its longer side ``longest``."""
    height, width = shape[0] * pixel_mm[0], shape[1] * pixel_mm[1]
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def grey_window(volume: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of a volume (of at most about 50 000 of its voxels): a bright outlier does not
    darken the whole image."""
    values = volume.reshape(-1)[:: max(1, volume.size // 50_000)]
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (low, high) if high > low else (low - 0.5, high + 0.5)


@dataclass
class Sheet:
    """A picture of ``width x height`` pixels (white), its texts and at most one colour bar.

    Positions are in pixels from the top-left corner.
    """

    width: int
    height: int
    pixels: np.ndarray = field(init=False)
    texts: list[tuple[float, float, str, dict[str, Any]]] = field(default_factory=list)
    letters: list[tuple[float, float, str]] = field(default_factory=list)
    colour_bar: tuple[int, int, int, int, float, matplotlib.colors.Colormap, str] | None = None

    def __post_init__(self) -> None:
        # RGBA: matplotlib would otherwise copy RGB pixels into RGBA ones when drawing.
        self.pixels = np.full((self.height, self.width, 4), 255, dtype=np.uint8)

    def paste(self, top: int, left: int, rgb: np.ndarray) -> None:
        self.pixels[top:top + rgb.shape[0], left:left + rgb.shape[1], :3] = rgb

    def text(self, x: float, y: float, text: str, **style: Any) -> None:
        self.texts.append((x, y, text, style))

    def letter(self, x: float, y: float, letter: str) -> None:
        """A letter centred at (x, y), e.g. an orientation letter on a view."""
        self.letters.append((x, y, letter))

    def edge_letters(self, letters: dict[str, str], top: int, left: int, height: int, width: int) -> None:
        """The orientation letters (``"left"``, ``"right"``, ``"top"``, ``"bottom"``) inside the edges of a view."""
        for edge, (x, y) in {"left": (left + 6, top + height / 2), "right": (left + width - 6, top + height / 2),
                             "top": (left + width / 2, top + 7),
                             "bottom": (left + width / 2, top + height - 7)}.items():
            self.letter(x, y, letters[edge])

    def figure(self) -> Figure:
        """The sheet as a figure: its pixels (:class:`SheetPixels`), the texts, the letters as one collection of
        outlines with gid ``"letters"`` (path ``i`` is letter ``i``; a text artist each would cost more than the
        rest of the figure), and the colour bar's axes labelled ``"colorbar"``."""
        figure = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        FigureCanvasAgg(figure)  # its own Agg canvas: no pyplot, no global backend
        figure.add_artist(SheetPixels(self.pixels))
        for x, y, text, style in self.texts:
            figure.text(x / self.width, 1.0 - y / self.height, text, **style)
        if self.letters:
            # Offsets in the sheet's pixels (from the top), outlines in points: right at any resolution.
            sheet = Affine2D().scale(1 / self.width, -1 / self.height).translate(0.0, 1.0) + figure.transFigure
            figure.add_artist(PathCollection(
                [letter_path(letter) for _, _, letter in self.letters], offsets=[(x, y) for x, y, _ in self.letters],
                offset_transform=sheet, transform=Affine2D().scale(1 / 72) + figure.dpi_scale_trans,
                facecolors="#ffd92f", edgecolors="black", linewidths=0.4, gid="letters"))
        if self.colour_bar is not None:
            left, top, width, height, limit, cmap, label = self.colour_bar
            cax = figure.add_axes((left / self.width, 1.0 - (top + height) / self.height, width / self.width,
                                   height / self.height))
            bar = figure.colorbar(ScalarMappable(norm=Normalize(vmin=-limit, vmax=limit), cmap=cmap), cax=cax)
            bar.set_ticks(np.linspace(-limit, limit, 5))  # the ends, their halves and zero: enough to read
            bar.set_label(label, fontsize=8)
            cax.set_label("colorbar")
            cax.tick_params(labelsize=7)
        return figure


class SheetPixels(Artist):
    """A sheet's RGBA pixels filling the figure, handed to the renderer as they are (gid ``"sheet"``).

    At the sheet's resolution (``DPI``) nothing is resampled: an image in an axes would be resampled and copied by
    matplotlib, which costs more than drawing everything else. At another resolution the pixels are scaled by
    nearest neighbour, and a vector backend (PDF) scales them itself.
    """

    def __init__(self, pixels: np.ndarray) -> None:
        super().__init__()
        self.set_gid("sheet")
        self.rgba = pixels

    def draw(self, renderer: Any) -> None:
        height, width = self.rgba.shape[:2]
        scale = renderer.dpi / DPI
        bottom_up = self.rgba[::-1]  # renderers take the bottom row first
        gc = renderer.new_gc()
        if renderer.option_scale_image():
            renderer.draw_image(gc, 0, 0, np.ascontiguousarray(bottom_up),
                                Affine2D().scale(width * scale, height * scale))
        else:
            if scale != 1:
                bottom_up = resample(bottom_up, round(height * scale), round(width * scale))
            renderer.draw_image(gc, 0, 0, np.ascontiguousarray(bottom_up))
        gc.restore()
