"""Capture layer: sources, sampling, live threading + reconnection, parallel decode, pipeline.

Uses the real H.264 clips in ../shared/videos (read in place, never copied) and, for the
network test, an ffmpeg stream server on 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from onsight.runtime.capture import (
    BackoffConfig,
    CaptureOptions,
    LiveSource,
    Pipeline,
    SourceKind,
    Stage,
    classify_spec,
    crosses_grid,
    decode_file_parallel,
    gstreamer_available,
    open_source,
)
from onsight.runtime.capture.parallel import _prepare, plan_segments
from onsight.runtime.errors import SourceError
from onsight.runtime.events import SourceEvent
from onsight.runtime.frames import Frame

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
CLIPS = ["book.mkv", "walk.mkv", "bottle-detection.mp4"]
FFPROBE = shutil.which("ffprobe")
FFMPEG = shutil.which("ffmpeg")


def clip(name: str) -> str:
    path = VIDEOS / name
    if not path.is_file():
        pytest.skip(f"sample video {path} not present (tests read ../shared/videos in place)")
    return str(path)


def ffprobe_timestamps(path: str) -> list[float]:
    """Every frame's pts in seconds, relative to the stream start (as OpenCV reports it)."""
    assert FFPROBE is not None
    start = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=start_time"]
        + ["-of", "csv=p=0", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time"]
        + ["-of", "csv=p=0", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Frames with side data print a trailing comma and an empty line; keep the numbers.
    pts = [float(line.strip().strip(",")) for line in out.splitlines() if line.strip(", \n")]
    return [t - float(start or 0.0) for t in pts]


# ------------------------------------------------------------------------------ specs


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        (0, SourceKind.CAMERA),
        ("2", SourceKind.CAMERA),
        ("/dev/video3", SourceKind.CAMERA),
        ("rtsp://cam.local/stream", SourceKind.URL),
        ("udp://127.0.0.1:5000", SourceKind.URL),
        ("v4l2src ! videoconvert ! appsink", SourceKind.GSTREAMER),
        ("clip.mp4", SourceKind.FILE),
    ],
)
def test_classify_spec(spec: str | int, kind: SourceKind) -> None:
    assert classify_spec(spec)[0] is kind


def test_classify_directory(tmp_path: Path) -> None:
    assert classify_spec(str(tmp_path))[0] is SourceKind.IMAGES


# ------------------------------------------------------------------------------ files


@pytest.mark.skipif(FFPROBE is None, reason="ffprobe not installed (apt-get install ffmpeg)")
@pytest.mark.parametrize("name", CLIPS)
def test_sampled_frames_match_ffprobe(name: str) -> None:
    path = clip(name)
    pts = ffprobe_timestamps(path)
    fps = 2.0
    expected = [t for prev, t in zip([None, *pts], pts) if crosses_grid(prev, t, fps)]
    interval = float(np.median(np.diff(pts)))

    with open_source(path, fps=fps, realtime=False) as src:
        items = list(src)
    frames = [i for i in items if isinstance(i, Frame)]
    statuses = [i.status for i in items if isinstance(i, SourceEvent)]

    assert statuses == ["opened", "ended"]
    assert len(frames) == len(expected) == int(pts[-1] * fps) + 1
    assert [f.index for f in frames] == list(range(len(frames)))
    for k, (frame, want) in enumerate(zip(frames, expected)):
        assert frame.timestamp == pytest.approx(want, abs=1e-3)
        # Sampled frames sit on the k/fps grid, at most one source frame late.
        assert 0 <= frame.timestamp - k / fps + 1e-6 < interval + 1e-3
        assert frame.image.dtype == np.uint8 and frame.image.ndim == 3
        assert frame.image.shape[2] == 3
    assert src.stats().frames_captured == len(pts)


@pytest.mark.skipif(FFPROBE is None, reason="ffprobe not installed (apt-get install ffmpeg)")
def test_every_frame_without_fps_matches_ffprobe_and_is_rgb() -> None:
    path = clip("walk.mkv")
    pts = ffprobe_timestamps(path)
    with open_source(path, fps=None, realtime=False) as src:
        frames = list(src.frames())
    assert len(frames) == len(pts)
    assert [f.timestamp for f in frames] == pytest.approx(pts, abs=1e-3)
    cap = cv2.VideoCapture(path)
    ok, bgr = cap.read()
    cap.release()
    assert ok and np.array_equal(frames[0].image, bgr[:, :, ::-1])


def test_realtime_file_paces_to_wall_clock_and_drops_stale_frames() -> None:
    path = clip("walk.mkv")  # 89 frames, 2.9 s
    start = time.monotonic()
    with open_source(path, fps=None, realtime=True) as src:
        items = []
        for item in src:
            items.append(item)
            time.sleep(0.1)  # a consumer slower than 30 fps
    elapsed = time.monotonic() - start
    frames = [i for i in items if isinstance(i, Frame)]
    stats = src.stats()

    assert elapsed >= 2.6  # paced, not decoded flat out
    assert [i.status for i in items if isinstance(i, SourceEvent)] == ["opened", "ended"]
    assert stats.frames_captured == 89
    assert stats.frames_dropped > 30  # the slow consumer only ever sees the newest frame
    assert stats.frames_delivered == len(frames) == stats.frames_sampled - stats.frames_dropped
    assert all(b.index > a.index for a, b in zip(frames, frames[1:]))


def test_image_directory(tmp_path: Path) -> None:
    colours = {}
    for i in (1, 2, 10):  # natural order: frame2 before frame10
        rgb = np.full((8, 12, 3), (10 * i, 100, 200), np.uint8)
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), rgb[:, :, ::-1])
        colours[i] = rgb
    (tmp_path / "frame5.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")

    with open_source(str(tmp_path), fps=4.0, realtime=False) as src:
        items = list(src)
    frames = [i for i in items if isinstance(i, Frame)]
    statuses = [i.status for i in items if isinstance(i, SourceEvent)]

    assert [f.timestamp for f in frames] == [0.0, 0.25, 0.75]  # frame5 is position 2
    assert [f.index for f in frames] == [0, 1, 2]
    for frame, i in zip(frames, (1, 2, 10)):
        assert np.array_equal(frame.image, colours[i])
    assert statuses == ["opened", "gap", "ended"]


# ------------------------------------------------------------------------------ bad sources


def _garbage(tmp_path: Path) -> str:
    path = tmp_path / "x.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(200_000))
    return str(path)


@pytest.mark.parametrize(
    ("make_spec", "needle"),
    [
        (lambda tmp: "/dev/video99", "no such device"),
        (lambda tmp: 99, "no such device"),
        (_garbage, "x.mp4"),
        (lambda tmp: str(tmp / "missing.mp4"), "not found"),
        (lambda tmp: "rtsp://127.0.0.1:1/none", "could not be opened"),
        (lambda tmp: "http://127.0.0.1:1/live.ts", "could not be opened"),
        (lambda tmp: str(tmp), "no images"),
    ],
    ids=["device", "index", "garbage", "missing", "rtsp", "http", "empty-dir"],
)
def test_bad_sources_fail_fast_with_the_source_named(make_spec, needle: str, tmp_path) -> None:
    spec = make_spec(tmp_path)
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        open_source(spec, options=CaptureOptions(open_timeout_s=3.0))
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert str(spec) in message and needle in message
    assert ";" in message  # what happened; what to do


@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed (apt-get install ffmpeg)")
def test_unsupported_codec_is_named(tmp_path: Path) -> None:
    path = tmp_path / "av1.mkv"
    done = subprocess.run(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48"]
        + ["-t", "0.4", "-c:v", "libaom-av1", "-cpu-used", "8", "-pix_fmt", "yuv420p", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("this ffmpeg has no AV1 encoder")
    cap = cv2.VideoCapture(str(path))
    decodes = cap.grab()
    cap.release()
    if decodes:
        pytest.skip("this OpenCV decodes AV1, so it is not an unsupported codec here")
    with pytest.raises(SourceError, match="codec 'av1'"):
        open_source(str(path))


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_gstreamer_without_support_explains_jetpack() -> None:
    with pytest.raises(SourceError, match="JetPack"):
        open_source("videotestsrc ! videoconvert ! appsink")


# ------------------------------------------------------------------------------ live threading


class FakeCamera:
    """A backend producing frames every `period` s that dies after `frames_before_death`."""

    def __init__(self, period: float = 0.005, frames_before_death: int | None = None) -> None:
        self.period = period
        self.left = frames_before_death
        self.released = False

    def grab(self) -> float | None:
        time.sleep(self.period)
        if self.left is not None:
            if self.left <= 0:
                return None
            self.left -= 1
        return time.monotonic()

    def retrieve(self) -> np.ndarray:
        return np.zeros((2, 2, 3), np.uint8)

    def describe(self) -> str:
        return "fake"

    def release(self) -> None:
        self.released = True


def _run_until(src: LiveSource, done, timeout_s: float) -> list[Frame | SourceEvent]:
    """Iterate a live source until done(items) or the timeout (then the source is closed)."""
    watchdog = threading.Timer(timeout_s, src.close)
    watchdog.start()
    items: list[Frame | SourceEvent] = []
    try:
        for item in src:
            items.append(item)
            if done(items):
                break
    finally:
        watchdog.cancel()
    return items


def _statuses(items) -> list[str]:
    return [i.status for i in items if isinstance(i, SourceEvent)]


def test_live_source_keeps_newest_and_counts_drops() -> None:
    src = LiveSource("fake", SourceKind.CAMERA, FakeCamera(), fps=None, reopen=FakeCamera)
    frames: list[Frame] = []

    def slow_consumer(items: list) -> bool:
        if isinstance(items[-1], Frame):
            frames.append(items[-1])
            time.sleep(0.05)  # ~10 camera frames arrive meanwhile
        return len(frames) >= 6

    with src:
        _run_until(src, slow_consumer, 10)
    stats = src.stats()
    assert stats.frames_delivered == len(frames) == 6
    # Every sampled frame was either taken or superseded (at most one still waiting), and
    # each frame taken is the newest: the ones captured during the 50 ms sleep were dropped.
    assert stats.frames_dropped >= stats.frames_sampled - stats.frames_delivered - 1
    assert stats.frames_dropped >= 10
    assert all(b.index - a.index >= 2 for a, b in zip(frames[1:], frames[2:]))
    assert all(time.monotonic() - f.timestamp < 5 for f in frames)


def test_live_source_reconnects_with_backoff_and_reports_the_gap() -> None:
    attempts = []

    def reopen() -> FakeCamera:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise SourceError("camera fake could not be opened: unplugged; plug it in")
        if len(attempts) == 3:
            raise RuntimeError("driver bug")  # unexpected errors are retried too
        return FakeCamera()

    backoff = BackoffConfig(initial_s=0.05, max_s=0.2, factor=2.0)
    src = LiveSource(
        "fake", SourceKind.CAMERA, FakeCamera(frames_before_death=5), fps=None, reopen=reopen,
        backoff=backoff,
    )  # fmt: skip
    with src:
        items = _run_until(src, lambda items: "resumed" in _statuses(items), 10)
        items += _run_until(src, lambda more: len(more) >= 3, 5)
    statuses = _statuses(items)
    assert statuses[:3] == ["opened", "reconnecting", "resumed"]
    resumed = next(i for i in items if isinstance(i, SourceEvent) and i.status == "resumed")
    assert resumed.gap_seconds >= 0.05 + 0.1 + 0.2  # waits 0.05, 0.1, 0.2, 0.2 (capped)
    gaps = np.diff(attempts)
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19  # exponential, bounded by max_s
    assert src.stats().reconnects == 1
    assert isinstance(items[-1], Frame)  # frames keep coming after the outage


def test_live_source_gives_up_when_told_to() -> None:
    def reopen() -> FakeCamera:
        raise SourceError("camera fake could not be opened: gone; plug it in")

    backoff = BackoffConfig(initial_s=0.02, max_s=0.05, give_up_after_s=0.3)
    src = LiveSource(
        "fake", SourceKind.CAMERA, FakeCamera(frames_before_death=2), fps=None, reopen=reopen,
        backoff=backoff,
    )  # fmt: skip
    with src:
        items = _run_until(src, lambda items: False, 10)  # ends by itself
    assert _statuses(items) == ["opened", "reconnecting", "failed"]
    assert not src.running


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(video: str, url: str, http: bool) -> subprocess.Popen[bytes]:
    assert FFMPEG is not None
    cmd = [FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", video]
    cmd += ["-c", "copy", "-f", "mpegts"]
    cmd += ["-listen", "1", url] if http else [url + "?pkt_size=1316"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed (apt-get install ffmpeg)")
@pytest.mark.parametrize("protocol", ["udp", "http"])
def test_network_stream_survives_server_restart(protocol: str) -> None:
    video = clip("walk.mkv")
    http = protocol == "http"
    port = _free_port(socket.SOCK_STREAM if http else socket.SOCK_DGRAM)
    url = f"http://127.0.0.1:{port}/live.ts" if http else f"udp://127.0.0.1:{port}"
    options = CaptureOptions(
        open_timeout_s=4.0,
        read_timeout_s=1.5,
        backoff=BackoffConfig(initial_s=0.3, max_s=1.0),
    )
    server = _serve(video, url, http)
    src = None
    try:
        deadline = time.monotonic() + 15
        while src is None:  # the server needs a moment to listen / send
            try:
                src = open_source(url, fps=10.0, options=options)
            except SourceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert isinstance(src, LiveSource)

        def frames_since(items: list, status: str) -> int:
            marks = [n for n, i in enumerate(items) if getattr(i, "status", None) == status]
            return sum(isinstance(i, Frame) for i in items[marks[-1] :]) if marks else 0

        before = _run_until(src, lambda items: frames_since(items, "opened") >= 10, 15)
        assert frames_since(before, "opened") >= 10, _statuses(before)
        _stop(server)
        outage = _run_until(src, lambda items: "reconnecting" in _statuses(items), 10)
        assert "reconnecting" in _statuses(outage)
        time.sleep(1.0)  # at least one reopen attempt fails while the server is down
        server = _serve(video, url, http)
        after = _run_until(src, lambda items: frames_since(items, "resumed") >= 10, 20)
    finally:
        if src is not None:
            src.close()
        _stop(server)

    statuses = _statuses(before + outage + after)
    assert statuses[:3] == ["opened", "reconnecting", "resumed"]
    assert "failed" not in statuses
    resumed = next(i for i in after if isinstance(i, SourceEvent) and i.status == "resumed")
    assert resumed.gap_seconds > 1.0
    frames = [i for i in before + outage + after if isinstance(i, Frame)]
    assert frames_since(after, "resumed") >= 10
    assert all(b.timestamp > a.timestamp for a, b in zip(frames, frames[1:]))
    assert frames[0].image.shape == (480, 640, 3)


# ------------------------------------------------------------------------------ parallel decode


def _assert_same_frames(expected: Iterator[Frame], actual: Iterator[Frame]) -> int:
    count = 0
    for a, b in zip(expected, actual, strict=True):  # streamed: ~1200 frames never all in RAM
        assert (a.index, a.timestamp) == (b.index, b.timestamp)
        assert np.array_equal(a.image, b.image), f"pixels differ at frame {a.index}"
        count += 1
    return count


@pytest.mark.parametrize(
    ("name", "fps", "use_ffprobe"),
    [
        ("bottle-detection.mp4", 2.0, True),
        ("bottle-detection.mp4", None, True),
        ("bottle-detection.mp4", 3.0, False),
        ("book.mkv", None, False),
    ],
)
def test_parallel_decode_matches_single_decoder(name, fps, use_ffprobe) -> None:
    if use_ffprobe and FFPROBE is None:
        pytest.skip("ffprobe not installed (apt-get install ffmpeg)")
    path = clip(name)
    segments = plan_segments(path, 3, use_ffprobe=use_ffprobe)
    assert len(segments) > 1  # otherwise this would compare a decoder with itself
    single = open_source(path, fps=fps, realtime=False).frames()
    parallel = decode_file_parallel(path, fps, workers=3, use_ffprobe=use_ffprobe)
    assert _assert_same_frames(single, parallel) > 0


def test_parallel_source_via_open_source_and_bounded_buffer() -> None:
    path = clip("bottle-detection.mp4")
    options = CaptureOptions(decode_workers=3, buffer_frames=6)
    with open_source(path, fps=4.0, realtime=False, options=options) as src:
        items = list(src)
    assert _statuses(items) == ["opened", "ended"]
    single = open_source(path, fps=4.0, realtime=False).frames()
    assert _assert_same_frames(single, (i for i in items if isinstance(i, Frame))) > 100

    decode = _prepare(path, None, 3, 6)
    most = 0
    for n, _ in enumerate(decode.frames()):
        most = max(most, sum(q.qsize() for q in decode._queues))
        if n < 60:
            time.sleep(0.002)  # a slow consumer: workers must wait, not pile up frames
    assert most <= 6


def test_parallel_decode_rejects_a_bad_file_at_once(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="x.mp4"):
        decode_file_parallel(_garbage(tmp_path), 2.0, workers=3)


# ------------------------------------------------------------------------------ pipeline


def _sleeper(seconds: float):
    def stage(item: int) -> int:
        time.sleep(seconds)
        return item

    return stage


def test_pipeline_throughput_approaches_the_slowest_stage() -> None:
    stages = [
        Stage("read", _sleeper(0.010)),
        Stage("slow", _sleeper(0.050)),
        Stage("post", _sleeper(0.020)),
    ]
    pipe = Pipeline(stages, queue_size=2)
    arrivals = []
    out = []
    for item in pipe.run(range(40)):
        arrivals.append(time.perf_counter())
        out.append(item)
    assert out == list(range(40))
    per_item = (arrivals[-1] - arrivals[4]) / (len(arrivals) - 5)  # steady state
    stats = pipe.stats()
    slowest = stats["slow"].total_ms / stats["slow"].items / 1000  # ~50 ms, more if loaded
    assert stats["slow"].items == 40
    assert slowest == pytest.approx(0.050, rel=0.3)
    # Within 10% of the slowest stage; running the stages one after another would take 80 ms.
    assert slowest * 0.95 <= per_item <= slowest * 1.10
    last, avg = pipe.stage_ms(), pipe.stage_ms(average=True)
    assert set(last) == set(avg) == {"read", "slow", "post"}
    assert 10 <= avg["read"] < avg["post"] < avg["slow"]


def test_pipeline_reraises_stage_errors_in_the_consumer() -> None:
    def explode(item: int) -> int:
        if item == 3:
            raise ValueError("bad item 3")
        return item

    pipe = Pipeline([Stage("ok", _sleeper(0.001)), Stage("explode", explode)])
    got = []
    with pytest.raises(ValueError, match="bad item 3") as info:
        for item in pipe.run(range(100)):
            got.append(item)
    assert got == [0, 1, 2]
    assert "explode" in "".join(getattr(info.value, "__notes__", ["explode"]))
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline")]


def test_pipeline_input_errors_skip_passthrough_and_early_exit() -> None:
    def source():
        yield 1
        yield "event"
        yield 2
        raise OSError("camera gone")

    from onsight.runtime.capture import SKIP

    pipe = Pipeline(
        [
            Stage("double", lambda x: 2 * x, passthrough=(str,)),
            Stage("drop4", lambda x: SKIP if x == 4 else x, passthrough=(str,)),
        ]
    )
    got = []
    with pytest.raises(OSError, match="camera gone"):
        for item in pipe.run(source()):
            got.append(item)
    assert got == [2, "event"]

    pipe = Pipeline([Stage("slow", _sleeper(0.01))])
    for n, _ in enumerate(pipe.run(range(1000))):
        if n == 3:
            break
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline")]
