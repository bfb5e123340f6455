"""Keep OpenCV's and FFmpeg's own stderr chatter out of the user's terminal.

When a capture fails to open, OpenCV prints "[ WARN:0@0.01] global cap.cpp ..." and FFmpeg
prints "moov atom not found" or "File ended prematurely" straight to stderr, in front of the
SourceError (or gap event) that tells the user what to do. With this module's logger at
DEBUG (`onsight -v`) both are left alone, so the raw diagnostics stay one flag away.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import cv2

log = logging.getLogger(__name__)

_FFMPEG_LEVEL_ENV = "OPENCV_FFMPEG_LOGLEVEL"
_AV_LOG_QUIET = "-8"

_lock = threading.Lock()
_depth = 0  # open calls currently inside quiet_opencv(), across threads
_saved_level: int | None = None  # OpenCV's log level before the outermost one began


def _quiet_ffmpeg_once() -> None:
    """Ask OpenCV to silence FFmpeg's av_log unless the user chose a level.

    OpenCV reads the variable once, when it first uses FFmpeg in this process, so this must
    run before the first capture opens; later calls (or a process that already used FFmpeg,
    e.g. through a VideoWriter) leave FFmpeg at OpenCV's default, errors only.
    """
    if _FFMPEG_LEVEL_ENV in os.environ or "OPENCV_FFMPEG_DEBUG" in os.environ:
        return
    os.environ[_FFMPEG_LEVEL_ENV] = _AV_LOG_QUIET


@contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's logging (and FFmpeg's, see above) around an open; nestable, threadsafe."""
    global _depth, _saved_level
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    _quiet_ffmpeg_once()
    with _lock:
        if _depth == 0:
            _saved_level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved_level is not None:
                # The level is process-wide: restore only when the last open has finished.
                cv2.utils.logging.setLogLevel(_saved_level)
                _saved_level = None
