"""Turn a source spec (camera, file, URL, GStreamer pipeline, image folder) into a Source.

Opening is eager: a bad spec raises SourceError from `open_source` within a few seconds, with
a message that names the source and suggests a fix. Reading is lazy: iterate the Source.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from ..errors import SourceError, SourceSpecError
from ..events import SourceEvent
from ..frames import Frame
from .quiet import quiet_opencv

log = logging.getLogger(__name__)

# Float slack when placing a timestamp on the k/fps grid (container clocks round to 1 ms or
# finer, so this only absorbs binary rounding such as 0.49999999).
GRID_EPS_S = 1e-6

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DEVICE_RE = re.compile(r"^/dev/video(\d+)$")

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


# --------------------------------------------------------------------------------- opening


def classify_spec(spec: str | int) -> tuple[SourceKind, str | int]:
    """Decide what a spec names; returns the kind and the normalised target."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise SourceSpecError(
            f"source {spec!r} is not a camera index, path or URL; pass {SPEC_FORMS}"
        )
    if isinstance(spec, int):
        return SourceKind.CAMERA, spec
    text = spec.strip()
    if not text:
        # Path("") is ".", which would quietly read the current folder as images.
        raise SourceSpecError(f"the source is empty ({spec!r}); pass {SPEC_FORMS}")
    if text.isdigit():
        return SourceKind.CAMERA, int(text)
    if _DEVICE_RE.match(text):
        return SourceKind.CAMERA, text
    if "!" in text:
        return SourceKind.GSTREAMER, text
    if text.startswith("file://"):
        text = text.removeprefix("file://")
        if not text:
            raise SourceSpecError(f"the source {spec!r} names no file; pass {SPEC_FORMS}")
    elif _URL_RE.match(text):
        return SourceKind.URL, text
    if Path(text).expanduser().is_dir():
        return SourceKind.IMAGES, str(Path(text).expanduser())
    return SourceKind.FILE, str(Path(text).expanduser())


def ffprobe_path() -> str | None:
    return shutil.which("ffprobe")


def run_ffprobe(args: list[str], timeout_s: float = 30.0) -> str | None:
    """stdout of `ffprobe -v error ARGS`, or None if ffprobe is missing or fails."""
    exe = ffprobe_path()
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "-v", "error", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("ffprobe %s failed: %s", args, exc)
        return None
    return done.stdout if done.returncode == 0 else None


def _list_cameras() -> list[str]:
    return sorted(glob.glob("/dev/video*"), key=_natural_key)


def _camera_hint() -> str:
    found = _list_cameras()
    if found:
        return f"cameras present: {', '.join(found)}; try --source {found[0]} or a file path"
    return "no cameras found (/dev/video* is empty); try a video file path or a stream URL"


def open_camera(target: str | int, clock_origin: float) -> CvBackend:
    label = f"camera {target}"
    device = f"/dev/video{target}" if isinstance(target, int) else target
    on_linux = sys.platform.startswith("linux")
    if on_linux and not os.path.exists(device):
        raise SourceError(f"{label} could not be opened: no such device {device}; {_camera_hint()}")
    api = cv2.CAP_V4L2 if on_linux else cv2.CAP_ANY
    with quiet_opencv():
        cap = cv2.VideoCapture(target, api)
    if not cap.isOpened():
        cap.release()
        why = "permission denied" if on_linux and not os.access(device, os.R_OK) else "busy"
        raise SourceError(
            f"{label} could not be opened ({why} or not a capture device); close other apps "
            f"using it, check you are in the 'video' group, or {_camera_hint()}"
        )
    return CvBackend(cap, live=True, clock_origin=clock_origin)


def open_url_capture(url: str, options: CaptureOptions) -> cv2.VideoCapture:
    """An opened cv2 capture on a stream URL, or SourceError saying why not."""
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(options.open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(options.read_timeout_s * 1000),
    ]
    with quiet_opencv():
        cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        hint = f"check the URL and that the server is running (try: ffprobe '{url}')"
        if url.lower().startswith("rtsp"):
            hint += (
                "; if it plays elsewhere but not here (firewall, NAT), set "
                "OPENCV_FFMPEG_CAPTURE_OPTIONS='rtsp_transport;tcp'"
            )
        raise SourceError(
            f"stream {url} could not be opened within {options.open_timeout_s:g} s "
            f"(unreachable, refused, or no video in it); {hint}"
        )
    return cap


def open_url(url: str, options: CaptureOptions, clock_origin: float) -> CvBackend:
    """A live stream, stamped with capture time."""
    return CvBackend(open_url_capture(url, options), live=True, clock_origin=clock_origin)


def recorded_url_backend(cap: cv2.VideoCapture, url: str) -> CvBackend:
    """A URL whose capture has a frame count (a file served over HTTP): played like a file,
    stamped with container time, ending at its end instead of reconnecting."""
    backend = CvBackend(cap, live=False, clock_origin=0.0)
    if not backend.prime() or backend.retrieve() is None:
        backend.release()
        raise SourceError(
            f"stream {url} is a recorded video of {backend.expected_frames} frames, but its "
            "first frame could not be read; if it is an .mp4, the server may not support "
            "range requests: serve it from one that does, or move its index to the front "
            "(ffmpeg -i in.mp4 -c copy -movflags +faststart out.mp4)"
        )
    return backend


def gstreamer_available() -> bool:
    match = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(match and match.group(1).upper() == "YES")


def open_gstreamer(pipeline: str, clock_origin: float) -> CvBackend:
    if not gstreamer_available():
        raise SourceError(
            f"GStreamer pipeline '{pipeline}' needs OpenCV built with GStreamer, and this cv2 "
            f"({cv2.__version__}, probably the pip wheel) has none; on Jetson use JetPack's "
            "system OpenCV (apt python3-opencv, without opencv-python in the venv), or pass a "
            "camera index, file or URL instead"
        )
    with quiet_opencv():
        cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    if not cap.isOpened():
        cap.release()
        raise SourceError(
            f"GStreamer pipeline '{pipeline}' did not start; it must end in 'appsink', and "
            "gst-launch-1.0 with '! fakesink' in place of appsink should run it"
        )
    return CvBackend(cap, live=True, clock_origin=clock_origin)


def _diagnose_unreadable(path: str) -> str:
    """Why a file that exists did not decode, as precisely as ffprobe can tell."""
    fix = (
        f"check it plays (ffplay '{path}') or re-encode it: ffmpeg -i '{path}' -c:v libx264 out.mp4"
    )
    if ffprobe_path() is None:
        return (
            f"video file {path} could not be decoded (not a video, damaged, or a codec this "
            f"OpenCV lacks); {fix}"
        )
    codec = run_ffprobe(
        ["-select_streams", "v:0", "-show_entries", "stream=codec_name", "-of", "csv=p=0", path]
    )
    if codec is None:
        return (
            f"video file {path} is not a video ffmpeg can read (damaged or another format); {fix}"
        )
    codec = codec.strip().strip(",")
    if not codec:
        return f"file {path} has no video stream; pass a video file, camera index or URL"
    return (
        f"video file {path} uses codec '{codec}', which this OpenCV build cannot decode; "
        f"re-encode it: ffmpeg -i '{path}' -c:v libx264 out.mp4"
    )


def open_file_capture(path: str, *, threads: int | None = None) -> cv2.VideoCapture:
    """An opened cv2 capture on a video file, or SourceError saying why not."""
    p = Path(path)
    if not p.exists():
        raise SourceError(
            f"video file {path} not found (relative to {Path.cwd()}); check the path, or pass "
            "a camera index such as --source 0"
        )
    if not p.is_file():
        raise SourceError(f"{path} is not a regular file; pass a video file or image folder")
    if not os.access(p, os.R_OK):
        raise SourceError(f"video file {path} is not readable (permission denied); chmod +r it")
    params = [cv2.CAP_PROP_N_THREADS, threads] if threads else []
    with quiet_opencv():
        cap = cv2.VideoCapture(str(p), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise SourceError(_diagnose_unreadable(path))
    return cap


def open_file(path: str, *, threads: int | None = None) -> CvBackend:
    backend = CvBackend(open_file_capture(path, threads=threads), live=False, clock_origin=0.0)
    # Opening succeeds for some non-video files and unknown codecs; the first frame tells.
    if not backend.prime() or backend.retrieve() is None:
        backend.release()
        raise SourceError(_diagnose_unreadable(path))
    return backend


def _natural_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def open_image_dir(folder: str, fps: float) -> ImageDirBackend:
    paths = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise SourceError(
            f"folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of "
            "frames, a video file, or a camera index"
        )
    paths.sort(key=lambda p: _natural_key(p.name))
    return ImageDirBackend(paths, fps)


def open_source(
    spec: str | int,
    fps: float | None = None,
    realtime: bool = True,
    *,
    options: CaptureOptions | None = None,
) -> Source:
    """Open a camera, file, stream URL, GStreamer pipeline or image folder.

    fps samples frames onto a k/fps timestamp grid (None keeps every frame). Live sources
    (cameras, live stream URLs, pipelines) always capture in a thread, keep only the newest
    sampled frame and reconnect on failure. Files, image folders and URLs that report a
    frame count (a video file served over HTTP) play once: paced to the wall clock in a
    thread when realtime is True; with realtime False yielding every sampled frame as fast
    as it decodes. Raises SourceError, naming the source and a fix, if it cannot be opened
    (SourceSpecError, a usage error, if the spec itself is malformed).
    """
    from .live import LiveSource  # live.py builds on this module
    from .parallel import ParallelFileSource

    options = options or CaptureOptions()
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise SourceError(f"fps {fps!r} for source {spec!r} must be a positive number, e.g. 2")
    kind, target = classify_spec(spec)
    name = str(spec)
    origin = time.monotonic()

    if kind is SourceKind.FILE:
        assert isinstance(target, str)
        if not realtime and options.decode_workers > 1:
            open_file_capture(target).release()  # same errors as the single-decoder path
            return ParallelFileSource(name, target, fps, options)
        backend: CaptureBackend = open_file(target)
    elif kind is SourceKind.IMAGES:
        assert isinstance(target, str)
        backend = open_image_dir(target, fps or options.image_fps)
    elif kind is SourceKind.URL:
        cap = open_url_capture(str(target), options)
        if finite_frame_count(cap) is not None:
            backend = recorded_url_backend(cap, str(target))
        else:  # live: reconnects when it drops, like a camera
            first = CvBackend(cap, live=True, clock_origin=origin)
            reopen = _live_opener(kind, target, options, origin)
            return LiveSource(name, kind, first, fps=fps, reopen=reopen, backoff=options.backoff)
    else:
        reopen = _live_opener(kind, target, options, origin)
        return LiveSource(name, kind, reopen(), fps=fps, reopen=reopen, backoff=options.backoff)

    if realtime:
        return LiveSource(name, kind, backend, fps=fps, reopen=None, pace=True)
    return SequentialSource(name, kind, backend, fps)


def _live_opener(
    kind: SourceKind, target: str | int, options: CaptureOptions, origin: float
) -> Callable[[], CaptureBackend]:
    if kind is SourceKind.CAMERA:
        return lambda: open_camera(target, origin)
    if kind is SourceKind.URL:
        return lambda: open_url(str(target), options, origin)
    return lambda: open_gstreamer(str(target), origin)
