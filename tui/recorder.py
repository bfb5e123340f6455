"""What the app keeps of a run: every event as a JSON line, in memory (for s) and appended to
--transcript as it happens, and the snapshot files that s writes."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import cv2

from onsight.runtime.errors import OnsightError
from onsight.runtime.events import Event, StatsEvent
from onsight.runtime.files import write_text_atomic
from onsight.runtime.frames import Frame
from onsight.runtime.transcript import Transcript

log = logging.getLogger(__name__)

TRANSCRIPT_STATS_EVERY = 10  # stats lines in the transcript: one per this many frames
MAX_KEPT_LINES = 200_000  # transcript lines kept in memory for the s key (~40 MB)


class Recorder:
    """Thread-safe: the narrate worker records while a save worker copies."""

    def __init__(self, transcript: Transcript | None) -> None:
        self.transcript = transcript
        # Bounded for week-long runs (--transcript keeps everything on disk).
        self._lines: deque[str] = deque(maxlen=MAX_KEPT_LINES)
        self._lock = threading.Lock()
        self._stats_logged_at = -TRANSCRIPT_STATS_EVERY

    def record(self, event: Event) -> None:
        """Keep one event (in a worker: the transcript's fsync is blocking I/O)."""
        if isinstance(event, StatsEvent):
            if event.frames_processed - self._stats_logged_at < TRANSCRIPT_STATS_EVERY:
                return
            self._stats_logged_at = event.frames_processed
        line = event.to_json()
        with self._lock:
            self._lines.append(line)
        if self.transcript is not None:
            try:
                self.transcript.append(line)
            except (OSError, ValueError, OnsightError) as e:  # disk full, closed: narrate on
                log.warning("transcript write failed: %s", e)

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def save(self, save_dir: Path, frame: Frame | None) -> tuple[Path | None, Path]:
        """The frame as PNG (when there is one) and the events so far as JSON lines, named by
        the time; raises OSError or OnsightError."""
        stem = time.strftime("onsight-%Y%m%d-%H%M%S")
        save_dir.mkdir(parents=True, exist_ok=True)
        image_path: Path | None = None
        if frame is not None:
            image_path = save_dir / f"{stem}.png"
            bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)  # imwrite expects BGR
            if not cv2.imwrite(str(image_path), bgr):
                raise OSError(f"OpenCV could not write {image_path}")
        text_path = save_dir / f"{stem}.jsonl"
        write_text_atomic(text_path, "".join(line + "\n" for line in self.lines))
        return image_path, text_path

    def close(self) -> None:
        if self.transcript is not None:
            self.transcript.close()
