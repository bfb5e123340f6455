"""Append-only JSON-lines transcript: each line is flushed and fsynced, so a crash loses nothing said."""

from __future__ import annotations

import os
from pathlib import Path

from onsight.runtime.errors import OnsightError


class Transcript:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        parent = next((q for q in self.path.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OnsightError(
                f"cannot write transcript {self.path}: {parent} is a file, not a folder; "
                "choose another path"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # line-buffered append: a kill -9 can at worst cut the line being written
            self._f = open(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as e:
            raise OnsightError(
                f"cannot write transcript {self.path}: {e.strerror}; choose another path"
            ) from e

    def append(self, line: str) -> None:
        try:
            self._f.write(line.rstrip("\n") + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OnsightError(
                f"cannot write transcript {self.path}: {e.strerror or e} (lines before this "
                "one are saved); free space or choose another path"
            ) from e

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # the line append() already reported could not be flushed
                pass

    def __enter__(self) -> Transcript:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
