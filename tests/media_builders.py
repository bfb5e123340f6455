"""Small media the runtime tests read: image-folder sources (no torch, no video codec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_folder(tmp_path: Path, n: int) -> Path:
    """A folder of n small PNG frames of rising brightness (an image-folder source)."""
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((32, 32, 3), i * 40 % 256, np.uint8))
    return folder
