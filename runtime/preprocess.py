"""Resize and pad frames exactly as the bundle's preprocessing says (the graph normalises)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

INTERPOLATION = {
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}


def letterbox(
    image: np.ndarray, size: int, pad_value: int = 0, interpolation: str = "bicubic"
) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (size, size, 3): long side resized to `size`, then padded
    symmetrically (VideoLLM-online pads to a square with black)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    if h == size and w == size:
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        interp = INTERPOLATION.get(interpolation, cv2.INTER_CUBIC)
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.full((size, size, 3), pad_value, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = image
    return out


def preprocess_batch(images: list[np.ndarray], pre: Mapping[str, Any]) -> np.ndarray:
    """Frames -> uint8 (B, S, S, 3) for the vision graph."""
    size = int(pre["image_size"])
    return np.stack(
        [
            letterbox(im, size, int(pre.get("pad_value", 0)), pre.get("interpolation", "bicubic"))
            for im in images
        ]
    )
