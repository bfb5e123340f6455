"""The unit that flows from capture to the engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One video frame as the runtime sees it."""

    image: np.ndarray  # (height, width, 3) uint8, RGB order
    timestamp: float  # seconds: presentation time for files, capture time for live sources
    index: int  # position in the sampled sequence of this source, from 0
