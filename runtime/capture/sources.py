"""What a video source is: its kinds and options, the OpenCV and image-folder backends, and
the Source classes that read them (`opening.open_source` turns a spec into one)."""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from ..events import SourceEvent
from ..frames import Frame

log = logging.getLogger(__name__)

# Float slack when placing a timestamp on the k/fps grid (container clocks round to 1 ms or
# finer, so this only absorbs binary rounding such as 0.49999999).
GRID_EPS_S = 1e-6

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# A container's frame count is an estimate (duration x fps, often one or two off), so an
# input only counts as ended early when it is clearly short of it on both measures.
EARLY_END_FRACTION = 0.9  # fewer than this share of the promised frames were read
EARLY_END_MIN_MISSING = 3  # and at least this many were missing
_MAX_SANE_FRAME_COUNT = 1 << 31  # live FFmpeg streams report huge or negative counts

SPEC_FORMS = (
    "a camera index (0) or device (/dev/video0), a video file, a folder of images, "
    "a stream URL (rtsp://, http://, udp://), or a GStreamer pipeline ending in appsink"
)


class SourceKind(Enum):
    """What a spec refers to; decides how it is opened and whether it is live."""

    CAMERA = "camera"
    FILE = "file"
    URL = "stream"
    GSTREAMER = "gstreamer"
    IMAGES = "images"

    @property
    def live(self) -> bool:
        return self in (SourceKind.CAMERA, SourceKind.URL, SourceKind.GSTREAMER)


@dataclass(frozen=True)
class BackoffConfig:
    """How a live source retries after it stops delivering frames."""

    initial_s: float = 0.5  # wait before the first reopen attempt
    max_s: float = 5.0  # longest wait between attempts
    factor: float = 2.0  # growth of the wait after each failed attempt
    give_up_after_s: float | None = None  # stop retrying (status "failed") after this; None: never


@dataclass(frozen=True)
class CaptureOptions:
    """Knobs for opening and reading sources that most callers leave alone."""

    open_timeout_s: float = 5.0  # a stream that has not opened after this long is an error
    read_timeout_s: float = 5.0  # a stream silent for this long is treated as dropped
    backoff: BackoffConfig = field(default_factory=BackoffConfig)  # live-source reconnect policy
    image_fps: float = 1.0  # timestamp spacing of an image folder when no fps is given
    decode_workers: int = 1  # >1: decode non-realtime files in parallel keyframe segments
    buffer_frames: int = 16  # bound on decoded frames held by the parallel decoder


@dataclass(frozen=True)
class CaptureStats:
    """Counters of one source, for StatsEvent."""

    frames_captured: int  # frames read from the device or container
    frames_sampled: int  # frames that passed fps sampling
    frames_delivered: int  # sampled frames the consumer received
    frames_dropped: int  # sampled frames replaced by a newer one before the consumer took them
    reconnects: int  # outages of a live source


class CaptureBackend(Protocol):
    """One opened capture: a thin, single-threaded wrapper the sources drive."""

    def grab(self) -> float | None:
        """Advance one frame; return its timestamp in seconds, or None at end or on failure."""

    def retrieve(self) -> np.ndarray | None:
        """RGB image of the last grabbed frame, or None if it cannot be decoded."""

    def describe(self) -> str:
        """One line for the "opened" event, e.g. "640x480 at 30 fps"."""

    def release(self) -> None:
        """Free the device or file; idempotent."""


def finite_frame_count(cap: cv2.VideoCapture) -> int | None:
    """The container's frame count, or None if it has none (a live stream, raw H.264)."""
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    if not math.isfinite(count) or not 0 < count < _MAX_SANE_FRAME_COUNT:
        return None
    return int(count)


def early_end_message(name: str, kind: SourceKind, read: int, expected: int | None) -> str | None:
    """Why an input that reached its end looks incomplete, or None if it looks whole."""
    if expected is None or read >= EARLY_END_FRACTION * expected:
        return None
    if expected - read < EARLY_END_MIN_MISSING:
        return None
    if kind is SourceKind.URL:
        why = "the server or network may have cut the download short; try again"
    else:
        why = f"it may be truncated (an unfinished copy or download); check it: ffprobe '{name}'"
    return f"{name} ended early at frame {read} of {expected}; {why}"


def crosses_grid(prev_ts: float | None, ts: float, fps: float | None) -> bool:
    """True if a k/fps grid point lies in (prev_ts, ts]: the frame at ts is the sampled one.

    Depends only on a frame and its predecessor, so a parallel decoder that knows the
    timestamp before each segment makes exactly the choices a single decoder makes. A kept
    frame lies at most one source frame interval after its grid point.
    """
    if fps is None or prev_ts is None:
        return True
    return math.floor((ts + GRID_EPS_S) * fps) > math.floor((prev_ts + GRID_EPS_S) * fps)


class FrameSampler:
    """Stateful `crosses_grid` over a stream of timestamps."""

    def __init__(self, fps: float | None) -> None:
        self._fps = fps
        self._prev: float | None = None

    def take(self, ts: float) -> bool:
        keep = crosses_grid(self._prev, ts, self._fps)
        self._prev = ts
        return keep


def to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR / BGRA / gray -> contiguous (H, W, 3) uint8 RGB."""
    if image.dtype != np.uint8:
        # 16-bit PNG/TIFF: scale down rather than wrap around.
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------- backends


class CvBackend:
    """A cv2.VideoCapture; timestamps are container time for files, capture time when live."""

    def __init__(self, cap: cv2.VideoCapture, *, live: bool, clock_origin: float) -> None:
        self._cap = cap
        self._live = live
        self._origin = clock_origin  # monotonic time the source was opened
        self._primed: float | None = None  # a frame grabbed while validating the open
        self._count = 0
        self._nominal_fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        # What the container promises; None for live captures, which have no end.
        self.expected_frames = None if live else finite_frame_count(cap)

    @property
    def nominal_fps(self) -> float:
        return self._nominal_fps

    def prime(self) -> bool:
        """Grab the first frame now (to prove the file decodes); the next grab returns it."""
        ts = self.grab()
        self._primed = ts
        return ts is not None

    def grab(self) -> float | None:
        if self._primed is not None:
            ts, self._primed = self._primed, None
            return ts
        if not self._cap.grab():
            return None
        self._count += 1
        if self._live:
            return time.monotonic() - self._origin
        ms = self._cap.get(cv2.CAP_PROP_POS_MSEC)
        if not math.isfinite(ms) or ms < 0:
            # Some containers carry no pts; fall back to the nominal frame rate.
            return (self._count - 1) / self._nominal_fps
        return ms / 1000.0

    def retrieve(self) -> np.ndarray | None:
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            return None
        return to_rgb(image)

    def describe(self) -> str:
        w = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return f"{w}x{h} at {self._nominal_fps:.3g} fps via {self._cap.getBackendName()}"

    def release(self) -> None:
        self._cap.release()


class ImageDirBackend:
    """Sorted images from a folder; image i is stamped i / fps."""

    def __init__(self, paths: list[Path], fps: float) -> None:
        self._paths = paths
        self._fps = fps
        self._pos = -1

    def grab(self) -> float | None:
        if self._pos + 1 >= len(self._paths):
            return None
        self._pos += 1
        return self._pos / self._fps

    def retrieve(self) -> np.ndarray | None:
        path = self._paths[self._pos]
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            log.warning("skipping %s: not a readable image", path)
            return None
        return to_rgb(image)

    def current_path(self) -> Path:
        return self._paths[self._pos]

    def describe(self) -> str:
        return f"{len(self._paths)} images at {self._fps:g} fps"

    def release(self) -> None:
        self._pos = len(self._paths)


# --------------------------------------------------------------------------------- sources


class _Counters:
    """Plain counters; ints updated under the GIL, read as a snapshot."""

    def __init__(self) -> None:
        self.captured = 0
        self.sampled = 0
        self.delivered = 0
        self.dropped = 0
        self.reconnects = 0

    def snapshot(self) -> CaptureStats:
        return CaptureStats(
            self.captured, self.sampled, self.delivered, self.dropped, self.reconnects
        )


class Source(ABC):
    """An iterable of Frame and SourceEvent items; close() it (or use `with`)."""

    def __init__(self, name: str, kind: SourceKind) -> None:
        self.name = name  # the spec as the user wrote it; used in events and errors
        self.kind = kind
        self._counters = _Counters()

    @abstractmethod
    def __iter__(self) -> Iterator[Frame | SourceEvent]: ...

    @abstractmethod
    def close(self) -> None: ...

    def interrupt(self) -> None:  # noqa: B027 - a hook, empty by default on purpose
        """Ask the iteration to end soon; safe from any thread, releases nothing (the
        iterating side's close() does). Finite sources end by themselves: nothing to do."""

    def frames(self) -> Iterator[Frame]:
        """Only the frames (events are logged instead)."""
        for item in self:
            if isinstance(item, Frame):
                yield item
            else:
                log.info("%s: %s %s", item.source, item.status, item.message)

    def stats(self) -> CaptureStats:
        return self._counters.snapshot()

    def _event(self, status: str, message: str = "", gap_seconds: float = 0.0) -> SourceEvent:
        return SourceEvent(status, self.name, message, gap_seconds)

    def _end_events(self, read: int, expected: int | None, fps: float | None) -> list[SourceEvent]:
        """The "ended" event, after a "gap" if fewer frames came than the container promised."""
        why = early_end_message(self.name, self.kind, read, expected)
        if why is None:
            return [self._event("ended", "end of input")]
        assert expected is not None
        missing_s = (expected - read) / fps if fps else 0.0
        log.warning("%s", why)
        return [self._event("gap", why, missing_s), self._event("ended", "end of input")]

    def _backend_end_events(self, backend: object) -> list[SourceEvent]:
        """_end_events for a backend that may know its length (CvBackend on a file)."""
        expected = getattr(backend, "expected_frames", None)
        fps = getattr(backend, "nominal_fps", None)
        return self._end_events(self._counters.captured, expected, fps)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequentialSource(Source):
    """A file or image folder read in the consumer's thread, every sampled frame, no pacing."""

    def __init__(self, name: str, kind: SourceKind, backend: CaptureBackend, fps: float | None):
        super().__init__(name, kind)
        self._backend = backend
        self._fps = fps
        self._closed = False

    def __iter__(self) -> Iterator[Frame | SourceEvent]:
        if self._closed:
            return
        yield self._event("opened", self._backend.describe())
        sampler = FrameSampler(self._fps)
        counters = self._counters
        while not self._closed:
            ts = self._backend.grab()
            if ts is None:
                break
            counters.captured += 1
            if not sampler.take(ts):
                continue
            image = self._backend.retrieve()
            if image is None:
                yield self._event("gap", f"frame at {ts:.3f} s could not be decoded; skipped")
                continue
            frame = Frame(image, ts, counters.sampled)
            counters.sampled += 1
            counters.delivered += 1
            yield frame
        if not self._closed:
            yield from self._backend_end_events(self._backend)
        self.close()

    def close(self) -> None:
        self._closed = True
        self._backend.release()
