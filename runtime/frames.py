"""The unit that flows from capture to the engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onsight.runtime.errors import OnsightError


@dataclass(frozen=True)
class Frame:
    """One video frame as the runtime sees it."""

    image: np.ndarray  # (height, width, 3) uint8, RGB order
    timestamp: float  # seconds: presentation time for files, capture time for live sources
    index: int  # position in the sampled sequence of this source, from 0


def check_image(image: object) -> np.ndarray:
    """The frame `push` takes, (H, W, 3) uint8 RGB, or an OnsightError saying how to get one."""
    if not isinstance(image, np.ndarray):
        raise OnsightError(
            f"push(): expected a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}"
        )
    shape, dtype = image.shape, image.dtype
    hint = ""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        hint = "; grayscale: np.repeat(img.reshape(h, w, 1), 3, axis=2)"
    elif image.ndim == 3 and image.shape[2] == 4:
        hint = "; RGBA: drop alpha with img[..., :3]"
    elif image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:
        hint = "; channels first (3, H, W): img.transpose(1, 2, 0)"
    elif image.ndim == 4 and image.shape[0] == 1:
        hint = "; one frame at a time: img[0]"
    elif image.ndim == 3 and image.shape[2] == 3 and dtype != np.uint8:
        if dtype.kind == "f":
            hint = "; floats in [0, 1]: (img * 255).clip(0, 255).astype(np.uint8)"
        else:
            hint = "; convert to 8 bits per channel, e.g. (img >> 8).astype(np.uint8) for 16"
    if image.ndim != 3 or image.shape[2] != 3 or dtype != np.uint8:
        raise OnsightError(
            f"push(): expected an (H, W, 3) uint8 RGB frame, got {dtype} {shape}{hint}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise OnsightError(f"push(): the frame is empty ({shape})")
    return np.ascontiguousarray(image)
