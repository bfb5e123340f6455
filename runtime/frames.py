"""The unit that flows from capture to the engine."""

from __future__ import annotations

import math
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
        if dtype.kind == "f":  # both ranges are common; scaling 0..255 by 255 gives white
            hint = (
                "; floats in [0, 1]: (img * 255).clip(0, 255).astype(np.uint8), "
                "floats in [0, 255]: img.clip(0, 255).astype(np.uint8)"
            )
        else:
            hint = "; convert to 8 bits per channel, e.g. (img >> 8).astype(np.uint8) for 16"
    if image.ndim != 3 or image.shape[2] != 3 or dtype != np.uint8:
        raise OnsightError(
            f"push(): expected an (H, W, 3) uint8 RGB frame, got {dtype} {shape}{hint}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise OnsightError(f"push(): the frame is empty ({shape})")
    return np.ascontiguousarray(image)


TIMESTAMP_HOW = "give seconds as a float or int (a ROS 2 stamp: stamp.sec + stamp.nanosec * 1e-9)"


def check_timestamp(timestamp: object) -> float:
    """The timestamp `push` takes, finite seconds as a float, or an OnsightError saying how
    to give one. Text and booleans are refused though float() would take them: a str or a
    bool given as a time is a bug in the caller, not a time."""
    if isinstance(timestamp, (str, bytes, bool, np.bool_)):
        raise OnsightError(
            f"push(): timestamp must be seconds as a number, got "
            f"{type(timestamp).__name__} {timestamp!r}; {TIMESTAMP_HOW}"
        )
    try:
        ts = float(timestamp)  # type: ignore[arg-type]
    except OverflowError:
        shown = repr(timestamp)  # an int of hundreds of digits: its start says enough
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise OnsightError(
            f"push(): timestamp {shown} is too large for seconds; {TIMESTAMP_HOW}"
        ) from None
    except (TypeError, ValueError):
        raise OnsightError(
            f"push(): timestamp must be seconds as a number, got {timestamp!r}; {TIMESTAMP_HOW}"
        ) from None
    if not math.isfinite(ts):
        raise OnsightError(f"push(): timestamp must be finite, got {timestamp!r}; {TIMESTAMP_HOW}")
    return ts
