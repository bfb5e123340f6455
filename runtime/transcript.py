"""Append-only JSON-lines transcript: each line is flushed and fsynced, so a crash loses nothing said."""

from __future__ import annotations

import os
from pathlib import Path

from onsight.runtime.errors import OnsightError


class Transcript:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # line-buffered append: a kill -9 can at worst cut the line being written
            self._f = open(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as e:
            raise OnsightError(
                f"cannot write transcript {self.path}: {e.strerror}; choose another path"
            ) from e

    def append(self, line: str) -> None:
        self._f.write(line.rstrip("\n") + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> Transcript:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
