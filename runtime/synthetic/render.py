"""Pixels of the synthetic world: backgrounds, shapes and the camera (shake, light, noise).

Drawn with cv2 primitives at sub-pixel positions onto a padded canvas, so slow motion stays
smooth and camera shake never shows an edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from .state import FrameState, ObjectState, WorldConfig

# RGB. Every colour has a channel >= 200 and backgrounds stay <= _BG_MAX, so at full brightness
# an object's exact colour never occurs in the background (tests mask objects by exact colour).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (170, 60, 220),
}
_BG_MAX = 150


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _fit_unit_box(poly: np.ndarray) -> np.ndarray:
    """Scale uniformly and centre so the bounding box is centred and its longer side is 1."""
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    return (poly - (lo + hi) / 2) / (hi - lo).max()


# Polygons in a unit box centred at 0, so a shape's bounding-box centre is the object's (x, y).
_POLYGONS = {
    "square": np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    "triangle": np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    "star": _fit_unit_box(_star()),
}
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel positions keep slow motion smooth
_ONE = 1 << _SHIFT


class Renderer:
    """Draws frames with cv2 primitives onto a padded background (padding absorbs shake)."""

    def __init__(self, config: WorldConfig, rng: np.random.Generator) -> None:
        self.cfg = config
        self.rng = rng  # per-frame sensor noise only
        self.pad = config.shake_px
        self.canvas = np.empty(
            (config.height + 2 * self.pad, config.width + 2 * self.pad, 3), dtype=np.uint8
        )

    def background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        h, w = self.canvas.shape[:2]

        def tone() -> np.ndarray:
            grey = rng.uniform(25, 110)
            return np.clip(grey + rng.uniform(-18, 18, size=3), 0, _BG_MAX)

        base = tone()
        img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        if kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            t = xx * np.cos(angle) + yy * np.sin(angle)
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            img = img * (1 - t[..., None]) + tone().astype(np.float32) * t[..., None]
        elif kind == "textured":
            amp = rng.uniform(10, 22)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            pattern = int(rng.integers(3))
            if pattern == 0:  # stripes
                period, angle = rng.uniform(6, 14), rng.uniform(0, np.pi)
                wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
            elif pattern == 1:  # checkerboard
                cell = int(rng.integers(4, 10))
                wave = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
            else:  # soft blobs
                coarse = rng.uniform(-1, 1, size=(6, 6)).astype(np.float32)
                wave = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
            img = img + amp * wave[..., None]
        elif kind == "noisy":
            img = img + rng.normal(0, rng.uniform(6, 12), size=(h, w, 3))
        return np.clip(np.rint(img), 0, _BG_MAX).astype(np.uint8)

    def render(self, state: FrameState, background: np.ndarray, shaky: bool) -> np.ndarray:
        cfg, pad, canvas = self.cfg, self.pad, self.canvas
        np.copyto(canvas, background)
        for o in state.objects:
            self._draw(canvas, o, pad)
        dx, dy = state.shake
        # Shake moves the camera, so the picture moves the other way.
        view = canvas[pad - dy : pad - dy + cfg.height, pad - dx : pad - dx + cfg.width]
        if state.brightness != 1.0:
            image = cv2.convertScaleAbs(view, alpha=state.brightness)
        else:
            image = view.copy()
        if state.noise_sigma > 0:
            noise = self._noise(state.noise_sigma)
            image = np.clip(image + noise, 0, 255).astype(np.uint8)
        return image

    def _noise(self, sigma: float) -> np.ndarray:
        shape = (self.cfg.height, self.cfg.width, 3)
        return self.rng.standard_normal(shape, dtype=np.float32) * sigma

    def _draw(self, canvas: np.ndarray, o: ObjectState, pad: int) -> None:
        colour = PALETTE[o.colour]
        cx, cy = o.x + pad, o.y + pad
        span = o.size_px - 1  # pixel centres span size-1, so the drawn box is size_px wide
        if o.shape in ("circle", "ring"):
            centre = (round(cx * _ONE), round(cy * _ONE))
            radius = span / 2
            if o.shape == "circle":
                cv2.circle(canvas, centre, round(radius * _ONE), colour, -1, cv2.LINE_8, _SHIFT)
            else:
                thick = max(2, round(radius * 0.45))
                mid = radius - thick / 2
                cv2.circle(canvas, centre, round(mid * _ONE), colour, thick, cv2.LINE_8, _SHIFT)
            return
        pts = np.rint((_POLYGONS[o.shape] * span + (cx, cy)) * _ONE).astype(np.int32)
        cv2.fillPoly(canvas, [pts], colour, cv2.LINE_8, _SHIFT)
