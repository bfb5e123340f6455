"""Live colour preview of the current frame, drawn with half blocks.

Each cell is '▀' with the foreground set to the upper pixel and the background to the lower
one, so a W x H cell area shows a W x 2H image with square-ish pixels and no graphics
protocol: it works in any truecolour terminal, over SSH, on a headless board.
"""

from __future__ import annotations

import cv2
import numpy as np
from rich.color import Color, ColorTriplet, ColorType
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

HALF_BLOCK = "▀"
# Every segment carries a style, even blank padding: Textual's NO_COLOR (monochrome) filter
# reads each segment's style and fails on None.
PLAIN = Style()


def _color(rgb: int) -> Color:
    # Color.from_rgb formats its name with a slow path; build the same Color directly.
    r, g, b = rgb >> 16, (rgb >> 8) & 0xFF, rgb & 0xFF
    return Color(f"#{rgb:06x}", ColorType.TRUECOLOR, triplet=ColorTriplet(r, g, b))


def fit_size(width: int, height: int, cols: int, rows: int) -> tuple[int, int]:
    """Largest (w, h) pixel size with the image's aspect ratio inside cols x 2*rows pixels;
    h is even so every cell gets a top and a bottom pixel."""
    if width <= 0 or height <= 0 or cols <= 0 or rows <= 0:
        return 0, 0
    scale = min(cols / width, 2 * rows / height)
    w = max(1, min(cols, round(width * scale)))
    h = max(2, min(2 * rows, 2 * round(height * scale / 2)))
    return w, h


def half_block_rows(image: np.ndarray, cols: int, rows: int) -> list[list[Segment]]:
    """Segments for each cell row: the image resized (aspect kept) and centred in cols x rows."""
    w, h = fit_size(image.shape[1], image.shape[0], cols, rows)
    if w == 0:
        return [[Segment(" " * cols, PLAIN)] for _ in range(rows)]
    # INTER_AREA averages instead of sampling, so a 640-px frame shrunk to 80 columns does
    # not shimmer from one frame to the next.
    small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    left = (cols - w) // 2
    top = (rows - h // 2) // 2
    pad_left = [Segment(" " * left, PLAIN)] if left else []
    pad_right = [Segment(" " * (cols - w - left), PLAIN)] if cols - w - left else []
    blank = [Segment(" " * cols, PLAIN)]
    # One int per cell: upper RGB in the high 24 bits, lower RGB in the low 24 bits, so the
    # per-cell Python loop compares ints and builds one Style per distinct colour pair.
    rgb = small.astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = ((packed[0::2] << 24) | packed[1::2]).tolist()
    styles: dict[int, Style] = {}
    out: list[list[Segment]] = [blank] * top
    for row in keys:
        segs = list(pad_left)
        run_key, run_len = -1, 0
        for key in row:
            if key == run_key:
                run_len += 1
                continue
            if run_len:
                segs.append(Segment(HALF_BLOCK * run_len, styles[run_key]))
            run_key, run_len = key, 1
            if key not in styles:
                styles[key] = Style.from_color(_color(key >> 24), _color(key & 0xFFFFFF))
        if run_len:
            segs.append(Segment(HALF_BLOCK * run_len, styles[run_key]))
        out.append(segs + pad_right)
    out.extend([blank] * (rows - len(out)))
    return out


class Preview(Widget):
    """Shows the latest RGB frame; re-renders on a new frame or a resize, nothing else."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._image: np.ndarray | None = None
        self.frame_index: int | None = None  # index of the frame on screen (for tests)
        self._strips: list[Strip] = []
        self._key: tuple[int, int, int] | None = None  # (cols, rows, id(image)) of _strips

    def show(self, image: np.ndarray, index: int) -> None:
        self._image = image
        self.frame_index = index
        self._key = None
        if self.display:  # hidden: skip the resize work until shown again
            self.refresh()

    def on_resize(self) -> None:
        self._key = None

    def render_line(self, y: int) -> Strip:
        cols, rows = self.size.width, self.size.height
        if self._image is None:
            return self._placeholder(y, cols, rows)
        key = (cols, rows, id(self._image))
        if key != self._key:
            self._strips = [Strip(segs, cols) for segs in half_block_rows(self._image, cols, rows)]
            self._key = key
        return self._strips[y] if 0 <= y < len(self._strips) else Strip.blank(cols, PLAIN)

    def _placeholder(self, y: int, cols: int, rows: int) -> Strip:
        if y != rows // 2:
            return Strip.blank(cols, PLAIN)
        text = "waiting for the first frame"[:cols]
        left = (cols - len(text)) // 2
        style = self.get_component_rich_style("preview--placeholder", partial=True)
        segments = [Segment(" " * left, PLAIN), Segment(text, style)]
        return Strip(segments, cols).adjust_cell_length(cols, PLAIN)

    COMPONENT_CLASSES = {"preview--placeholder"}
