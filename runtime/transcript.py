"""Append-only JSON-lines transcript: each line is flushed and fsynced, so a crash loses nothing said."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from onsight.runtime.errors import OnsightError

log = logging.getLogger(__name__)

TAIL_BYTES = 1 << 16  # how much of an existing file is read first to check it is a transcript
MAX_TAIL_BYTES = 1 << 24  # ... and at most, looking for the start of a long last line
EVENT_START = b'{"type": "'  # how every line Event.to_json writes begins


def _is_event(line: bytes) -> bool:
    """One line of a transcript: a JSON object (an event)."""
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _read_tail(path: Path, size: int) -> tuple[bytes, bool]:
    """The end of the file, long enough to hold a whole line before the last one (an event
    can outgrow TAIL_BYTES); True if it starts mid-file, so its first line is partial."""
    n = TAIL_BYTES
    with open(path, "rb") as f:
        while True:
            start = max(0, size - n)
            f.seek(start)
            tail = f.read()
            if start == 0 or tail.count(b"\n") >= 2 or n >= MAX_TAIL_BYTES:
                return tail, start > 0
            n *= 4


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
            torn = self._check_existing()
            # line-buffered append: a kill -9 can at worst cut the line being written
            self._f = open(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as e:
            raise OnsightError(
                f"cannot write transcript {self.path}: {e.strerror}; choose another path"
            ) from e
        if torn:
            log.warning("transcript %s: dropped a line cut short by an earlier crash", self.path)

    def _check_existing(self) -> bool:
        """Refuse to append to a file that is not a JSON-lines transcript (a video given by
        mistake would be corrupted); cut off a last line a killed run left half written, so
        the lines appended now parse. True if one was cut."""
        size = self.path.stat().st_size if self.path.is_file() else 0
        if size == 0:
            return False
        tail, mid_file = _read_tail(self.path, size)
        if not tail.strip():
            return False
        *complete, rest = tail.split(b"\n")  # rest: what follows the last newline
        if mid_file:
            complete = complete[1:]  # the first may start mid-line
        last = next((x for x in reversed(complete) if x.strip()), None)
        if last is not None:
            ours = _is_event(last)
        else:  # one line in all: whole, or the first event of a run killed while writing it
            head = rest.lstrip()[: len(EVENT_START)]
            ours = _is_event(rest) or (not mid_file and EVENT_START.startswith(head))
        if not ours:
            raise OnsightError(
                f"cannot append to {self.path}: it is not an onsight transcript (JSON lines); "
                "choose another --transcript path"
            )
        if not rest.strip():
            return False
        if _is_event(rest):  # a whole last line without its newline
            with open(self.path, "ab") as f:
                f.write(b"\n")
            return False
        with open(self.path, "r+b") as f:  # the half-written line of a killed run
            f.truncate(size - len(rest))
        return True

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
