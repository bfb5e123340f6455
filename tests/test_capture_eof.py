"""Capture: how inputs end (recorded video over HTTP, truncated files), empty specs, and
keeping OpenCV's / FFmpeg's stderr out of the user's way.

Every video here is written by the test itself (OpenCV's MJPEG encoder, always built in) and
served, where needed, by a stdlib HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from onsight.runtime.capture import (
    CaptureOptions,
    SourceKind,
    SourceSpecError,
    classify_spec,
    open_source,
)
from onsight.runtime.capture.sources import finite_frame_count
from onsight.runtime.errors import SourceError
from onsight.runtime.events import SourceEvent
from onsight.runtime.frames import Frame


def write_video(path: Path, frames: int, fps: float) -> Path:
    """Random-noise MJPEG frames (so every frame costs about the same number of bytes)."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV cannot write MJPEG into {path.suffix}")
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def truncated_copy(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"cut-{path.name}")
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL) of a `python -m http.server`-like server on 127.0.0.1."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def drain(src, timeout_s: float = 20.0) -> list[Frame | SourceEvent]:
    """Every item of a source; a watchdog closes it if it never ends (the old bug)."""
    watchdog = threading.Timer(timeout_s, src.close)
    watchdog.start()
    try:
        return list(src)
    finally:
        watchdog.cancel()
        src.close()


def statuses(items: list) -> list[str]:
    return [i.status for i in items if isinstance(i, SourceEvent)]


# ------------------------------------------------------------------- recorded video over HTTP


def test_video_file_over_http_plays_once_with_its_own_timestamps(http_root) -> None:
    root, base = http_root
    write_video(root / "clip.avi", frames=20, fps=20.0)
    with open_source(f"{base}/clip.avi", fps=None, realtime=False) as src:
        items = drain(src)
    frames = [i for i in items if isinstance(i, Frame)]

    assert statuses(items) == ["opened", "ended"]
    assert len(frames) == src.stats().frames_captured == 20
    assert [f.timestamp for f in frames] == pytest.approx([k / 20 for k in range(20)], abs=2e-3)
    assert src.stats().reconnects == 0


def test_video_file_over_http_in_realtime_is_paced_then_ends(http_root) -> None:
    root, base = http_root
    write_video(root / "clip.mkv", frames=20, fps=20.0)  # 1 s
    start = time.monotonic()
    src = open_source(f"{base}/clip.mkv", fps=None, realtime=True)
    items = drain(src)
    elapsed = time.monotonic() - start
    stats = src.stats()

    assert statuses(items) == ["opened", "ended"]
    assert 0.9 <= elapsed < 10  # paced by its timestamps, and it ends
    assert stats.frames_captured == 20 and stats.reconnects == 0
    assert stats.frames_delivered == sum(isinstance(i, Frame) for i in items)
    assert all(f.timestamp < 1.0 for f in items if isinstance(f, Frame))  # container time


class _Cap:
    def __init__(self, count: float) -> None:
        self.count = count

    def get(self, prop: int) -> float:
        assert prop == cv2.CAP_PROP_FRAME_COUNT
        return self.count


@pytest.mark.parametrize(
    ("reported", "expected"),
    [(89.0, 89), (-3074457345618259.0, None), (-9.2e18, None), (0.0, None), (float("nan"), None)],
    ids=["file", "mpegts-live", "mjpeg-live", "raw", "nan"],
)
def test_only_a_real_frame_count_makes_a_url_finite(reported: float, expected) -> None:
    # The negative values are what OpenCV reports for live HTTP MPEG-TS and MJPEG streams.
    assert finite_frame_count(_Cap(reported)) == expected


# ------------------------------------------------------------------- truncated files


@pytest.mark.parametrize(
    ("realtime", "workers"),
    [(False, 1), (True, 1), (False, 2)],
    ids=["sequential", "realtime", "parallel"],
)
def test_truncated_file_reports_where_it_ended_then_ends(
    tmp_path: Path, realtime: bool, workers: int
) -> None:
    video = write_video(tmp_path / "walk.mkv", frames=60, fps=30.0)
    cut = truncated_copy(video, keep=0.4)
    options = CaptureOptions(decode_workers=workers)
    src = open_source(str(cut), fps=None, realtime=realtime, options=options)
    items = drain(src)
    read = src.stats().frames_captured

    assert statuses(items) == ["opened", "gap", "ended"]
    assert 0 < read < 40
    gap = next(i for i in items if isinstance(i, SourceEvent) and i.status == "gap")
    assert f"ended early at frame {read} of 60" in gap.message
    assert "truncated" in gap.message and str(cut) in gap.message
    assert gap.gap_seconds == pytest.approx((60 - read) / 30.0)
    assert items[-1].status == "ended"


def test_complete_file_ends_without_a_gap(tmp_path: Path) -> None:
    video = write_video(tmp_path / "whole.mkv", frames=60, fps=30.0)
    with open_source(str(video), fps=None, realtime=False) as src:
        items = drain(src)
    assert statuses(items) == ["opened", "ended"]
    assert src.stats().frames_captured == 60


# ------------------------------------------------------------------- empty spec


@pytest.mark.parametrize("spec", ["", "   ", "file://"])
def test_empty_source_is_a_usage_error_listing_what_a_source_can_be(spec: str) -> None:
    with pytest.raises(SourceSpecError) as info:
        classify_spec(spec)
    message = str(info.value)
    assert "no images" not in message  # not read as the current folder
    assert "camera index" in message and "video file" in message and "URL" in message
    assert info.value.exit_code == 2  # a bad argument, not a failing source (3)
    assert isinstance(info.value, SourceError)  # callers catching SourceError still do
    with pytest.raises(SourceSpecError):
        open_source(spec)


def test_folder_and_file_specs_still_classify(tmp_path: Path) -> None:
    assert classify_spec(str(tmp_path))[0] is SourceKind.IMAGES
    assert classify_spec(f"file://{tmp_path}/a.mkv")[0] is SourceKind.FILE


# ------------------------------------------------------------------- stderr chatter

_OPEN_AND_READ = """
import logging, sys
logging.basicConfig(level=getattr(logging, sys.argv[1]))
from onsight.runtime.capture import open_source
from onsight.runtime.errors import SourceError
try:
    open_source(sys.argv[2])
except SourceError as exc:
    print("refused:", exc)
with open_source(sys.argv[3], realtime=False) as src:
    print(sum(1 for _ in src.frames()), "frames")
"""


def _run_capture(level: str, bad: Path, cut: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    return subprocess.run(
        [sys.executable, "-c", _OPEN_AND_READ, level, str(bad), str(cut)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )


def test_opencv_and_ffmpeg_chatter_is_hidden_unless_debugging(tmp_path: Path) -> None:
    mp4 = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(mp4), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (64, 48))
    for _ in range(30):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    bad = truncated_copy(mp4, keep=0.5)  # its index (moov) is at the end: cut off
    cut = truncated_copy(write_video(tmp_path / "walk.mkv", frames=60, fps=30.0), keep=0.4)

    quiet = _run_capture("WARNING", bad, cut)
    assert "refused:" in quiet.stdout and str(bad) in quiet.stdout
    assert "[ WARN" not in quiet.stderr  # OpenCV's "cap.cpp ... can't be used to capture"
    assert "ended prematurely" not in quiet.stderr  # FFmpeg's own words for the cut file
    assert "ended early at frame" in quiet.stderr  # onsight's own warning, via logging

    loud = _run_capture("DEBUG", bad, cut)  # what `onsight -v` gets
    assert "[ WARN" in loud.stderr and "ended prematurely" in loud.stderr
