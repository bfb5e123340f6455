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
from collections.abc import Callable
from pathlib import Path

import cv2

from ..errors import SourceError, SourceSpecError
from .live import LiveSource
from .quiet import quiet_opencv
from .sources import (
    IMAGE_SUFFIXES,
    SPEC_FORMS,
    CaptureBackend,
    CaptureOptions,
    CvBackend,
    ImageDirBackend,
    SequentialSource,
    Source,
    SourceKind,
    finite_frame_count,
)

log = logging.getLogger(__name__)

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DEVICE_RE = re.compile(r"^/dev/video(\d+)$")


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
    from .parallel import ParallelFileSource  # parallel.py uses this module's openers

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
