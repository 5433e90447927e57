"""What the page and its screenshot say about the views: each slice view's name, orientation letters and position in
mm (as Slicer's slice views name them), the overlay's colour legend, and the screenshot of the layout as shown, with
all of these drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from SegExplainMRML import display, results, workflow
from trame_slicer.views import Layout, LayoutDirection

from SegExplainLib.io.figures.views import direction_letter, position_label

#: Colour stops of the legend's bar, from max|R| against the class (blue) to max|R| for it (red).
LEGEND_STOPS = 9
#: Height of the screenshot's band under the views that holds the sequence and the legend (pixels).
LEGEND_BAND = 48
_FONT_SIZE = 14


@dataclass(frozen=True)
class Legend:
    """The colour legend of a shown explanation.

    Attributes:
        sequence: The sequence shown (its relevance and, under it, its image).
        classIndex: The class explained.
        amplitude: max|R| of the shown map: the ends of the colour scale.
    """

    sequence: str
    classIndex: int
    amplitude: float

    @classmethod
    def of(cls, explanation: results.Explanation, parameters: Any) -> Legend:
        index = workflow.displayedIndex(explanation, parameters)
        window = explanation.overlay.GetDisplayNode().GetWindow()  # [-max|R|, max|R|], set by showExplanation
        return cls(explanation.sequenceNames[index], int(explanation.record["target"]["class_index"]), window / 2.0)

    def state(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "class_index": self.classIndex, "amplitude": f"{self.amplitude:.3g}"}

    def texts(self) -> list[str]:
        """The legend's words, as the page and the screenshot show them."""
        return [f"-{self.amplitude:.3g}", f"+{self.amplitude:.3g}",
                f"blue: against class {self.classIndex}, red: for class {self.classIndex}"]


def legendColors() -> np.ndarray:
    """RGB (0-255) of the legend's stops, from the overlay's own colour table (its transparent centre drawn white)."""
    values = np.linspace(-1.0, 1.0, LEGEND_STOPS)
    colors = display.divergingColors(values)
    rgb = np.where(colors[:, 3:] > 0, colors[:, :3], 1.0)
    return np.round(255 * rgb).astype(np.uint8)


def legendGradient() -> str:
    """The legend's bar as a CSS background."""
    return f"linear-gradient(to right, {', '.join(f'rgb({r}, {g}, {b})' for r, g, b in legendColors())})"


def sliceViewLabels(sliceNode: Any, name: str) -> dict[str, Any]:
    """A slice view's name, the patient directions at its edges and its position, from its slice node."""
    matrix = sliceNode.GetSliceToRAS()
    right, up, normal, origin = (np.array([matrix.GetElement(row, column) for row in range(3)]) for column in range(4))
    return {"name": name, "position": position_label(normal, origin),
            "letters": {"left": direction_letter(-right), "right": direction_letter(right),
                        "top": direction_letter(up), "bottom": direction_letter(-up)}}


def _font() -> Any:
    return ImageFont.load_default(size=_FONT_SIZE)


def _labelTile(pixels: np.ndarray, labels: dict[str, Any] | None, drawn: list[str]) -> np.ndarray:
    """A view's image (RGB or RGBA) as RGBA with its name, position and edge letters drawn in."""
    image = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).convert("RGBA")
    if labels is None:
        return np.asarray(image)
    draw, font = ImageDraw.Draw(image), _font()
    width, height = image.size
    texts = [((6, 4), labels["name"], "la")]
    if "position" in labels:
        texts.append(((6, 6 + _FONT_SIZE), labels["position"], "la"))
    anchors = {"left": ((4, height / 2), "lm"), "right": ((width - 4, height / 2), "rm"),
               "top": ((width / 2, 4), "mt"), "bottom": ((width / 2, height - 4), "mb")}
    texts += [(anchors[edge][0], letter, anchors[edge][1]) for edge, letter in labels.get("letters", {}).items()]
    for xy, text, anchor in texts:  # white with a black outline: readable on anatomy and on the overlay
        draw.text(xy, text, fill="white", font=font, anchor=anchor, stroke_width=2, stroke_fill="black")
        drawn.append(text)
    return np.asarray(image)


def _arrange(item: Any, tiles: dict[str, np.ndarray]) -> np.ndarray:
    """The tiles of a layout (nested rows and columns) put together as it shows them, gaps in black."""
    if not isinstance(item, Layout):
        return tiles[item.singleton_tag]
    parts = [_arrange(child, tiles) for child in item.items]
    horizontal = item.direction == LayoutDirection.Horizontal
    extent = max(part.shape[0 if horizontal else 1] for part in parts)
    padded = []
    for part in parts:
        shape = (extent, part.shape[1], 4) if horizontal else (part.shape[0], extent, 4)
        canvas = np.zeros(shape, np.uint8)
        canvas[..., 3] = 255
        canvas[:part.shape[0], :part.shape[1]] = part
        padded.append(canvas)
    return np.concatenate(padded, axis=1 if horizontal else 0)


def _legendBand(width: int, sequence: str, legend: Legend | None, drawn: list[str]) -> np.ndarray:
    image = Image.new("RGBA", (width, LEGEND_BAND), "black")
    draw, font = ImageDraw.Draw(image), _font()
    texts = [((6, 4), f"Sequence: {sequence}")]
    if legend is not None:
        bar = np.repeat(legendColors(), 20, axis=0)  # LEGEND_STOPS stops, 20 pixels each
        image.paste(Image.fromarray(np.repeat(bar[None], 12, axis=0)), (60, LEGEND_BAND - 18))
        low, high, meaning = legend.texts()
        texts += [((6, LEGEND_BAND - 20), low), ((66 + bar.shape[0], LEGEND_BAND - 20), high),
                  ((6 + width // 3, 4), meaning)]
    for xy, text in texts:
        draw.text(xy, text, fill="white", font=font)
        drawn.append(text)
    return np.asarray(image)


def composeLayout(layout: Layout, tiles: dict[str, np.ndarray], labels: dict[str, dict[str, Any]], *,
                  sequence: str, legend: Legend | None) -> tuple[np.ndarray, list[str]]:
    """The screenshot of the views as the page lays them out, with their labels, the sequence and the legend.

    Args:
        layout: The page's layout (rows and columns of views).
        tiles: Each view's image (RGB or RGBA, rows top to bottom), by its tag.
        labels: Each view's :func:`sliceViewLabels` (a 3D view: its name only), by its tag.
        sequence: The sequence shown.
        legend: The shown explanation's legend; None without one.

    Returns:
        The RGBA image and the texts drawn in it.
    """
    drawn: list[str] = []
    labelled = {tag: _labelTile(pixels, labels.get(tag), drawn) for tag, pixels in tiles.items()}
    views = _arrange(layout, labelled)
    return np.concatenate([views, _legendBand(views.shape[1], sequence, legend, drawn)]), drawn
