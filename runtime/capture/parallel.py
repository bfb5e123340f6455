"""Decode one long file with several decoders at once, in order, in bounded memory.

QuickVideo's idea: split the file at keyframes, decode the pieces concurrently (cv2 releases
the GIL while decoding), and hand frames over in order. Each piece is decoded from a
keyframe, so its pixels equal a single decoder's; segment boundaries are timestamps, so every
frame belongs to exactly one piece; and fps sampling depends only on a frame and its
predecessor, so the sampled frames and timestamps are exactly those of `open_source(path,
fps, realtime=False)`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from ..events import SourceEvent
from ..frames import Frame
from .opening import open_file_capture, run_ffprobe
from .sources import (
    CaptureOptions,
    CvBackend,
    Source,
    SourceKind,
    crosses_grid,
    finite_frame_count,
)

log = logging.getLogger(__name__)

# Boundary slack: frames are >= ~4 ms apart, container clocks are 1 ms or finer, and
# ffprobe prints microseconds, so 1 ms separates "this frame" from "the next" safely.
_BOUNDARY_EPS_S = 1e-3
# OpenCV's seek aims av_seek_frame 16 frames before the target and then decodes forward
# internally (those frames are not returned). Starting a segment a few frames after its
# keyframe, and seeking 16 frames before that, makes the seek land on the keyframe itself
# instead of the previous one, so each segment decodes only ~40 frames it does not own.
_OPENCV_SEEK_BACKOFF_FRAMES = 16
_SEGMENT_LEAD_FRAMES = 40
_POLL_S = 0.1


@dataclass(frozen=True)
class Segment:
    """A time range of the file that one decoder owns."""

    index: int  # position in the file, from 0
    start_s: float  # first timestamp owned (inclusive); the first segment starts at 0
    end_s: float | None  # next segment's start (exclusive); None: to the end of the file
    seek_s: float | None  # where to seek before decoding; None: decode from the file start


@dataclass(frozen=True)
class _Decoded:
    timestamp: float
    image: np.ndarray
    keep: bool | None  # None: first frame of its segment; the merger decides


@dataclass(frozen=True)
class _SegmentEnd:
    last_timestamp: float | None  # of the segment's last frame, kept or not
    decoded: int  # frames the segment owned


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _probe(path: str) -> tuple[float, float, list[float]] | None:
    """(duration s, fps, keyframe times s) relative to the stream start, or None."""
    out = run_ffprobe(
        [
            "-select_streams",
            "v:0",
            "-skip_frame",
            "nokey",
            "-show_entries",
            "stream=start_time,avg_frame_rate:format=duration:frame=pts_time",
            "-of",
            "json",
            path,
        ]
    )
    if out is None:
        return None
    try:
        info = json.loads(out)
        stream = info["streams"][0]
        start = float(stream.get("start_time", 0.0) or 0.0)
        num, _, den = str(stream.get("avg_frame_rate", "0/1")).partition("/")
        fps = float(num) / float(den or 1) if float(den or 1) else 0.0
        duration = float(info["format"]["duration"]) - start
        keys = sorted(
            float(f["pts_time"]) - start for f in info.get("frames", []) if "pts_time" in f
        )
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        log.debug("ffprobe output for %s not understood: %s", path, exc)
        return None
    if not (fps > 0 and duration > 0):
        return None
    return duration, fps, keys


def _cv_duration(path: str) -> tuple[float, float]:
    cap = open_file_capture(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        cap.release()
    return (count / fps if count > 0 else 0.0), fps


def _container_length(path: str) -> tuple[int | None, float]:
    """(frame count the container promises or None, nominal fps), for the early-end check."""
    cap = open_file_capture(path)
    try:
        return finite_frame_count(cap), cap.get(cv2.CAP_PROP_FPS) or 30.0
    finally:
        cap.release()


def plan_segments(
    path: str, workers: int, *, use_ffprobe: bool = True, min_segment_s: float = 2.0
) -> list[Segment]:
    """Split a file into about 2 x workers segments at keyframes (ffprobe) or evenly."""
    probed = _probe(path) if use_ffprobe else None
    if probed is not None:
        duration, fps, keys = probed
        lead = _SEGMENT_LEAD_FRAMES / fps
        nexts = [*keys[1:], duration]
        # A segment starts a few frames after a keyframe (see _SEGMENT_LEAD_FRAMES).
        candidates = [k + min(lead, 0.5 * (n - k)) for k, n in zip(keys, nexts) if k > 0]
        how = f"{len(keys)} keyframes"
    else:
        duration, fps = _cv_duration(path)
        pieces = max(1, 2 * workers)
        candidates = [duration * i / pieces for i in range(1, pieces)]
        how = "even split (no ffprobe)"
    target = max(min_segment_s, duration / max(1, 2 * workers))
    starts = [0.0]
    for t in candidates:
        if t - starts[-1] >= target and duration - t >= 0.5 * target:
            starts.append(t)
    seek_back = _OPENCV_SEEK_BACKOFF_FRAMES / fps
    segments = [
        Segment(
            index=i,
            start_s=s,
            end_s=starts[i + 1] if i + 1 < len(starts) else None,
            seek_s=(s - seek_back) if i > 0 and s - seek_back > 0 else None,
        )
        for i, s in enumerate(starts)
    ]
    log.debug("%s: %d segments from %s", path, len(segments), how)
    return segments


def _positioned_capture(path: str, seg: Segment, threads: int) -> CvBackend:
    """A capture whose next frame is at or before seg.start_s (verified, not assumed)."""
    cap = open_file_capture(path, threads=threads)
    if seg.seek_s is None:
        return CvBackend(cap, live=False, clock_origin=0.0)
    for back_s in (0.0, 1.0, 4.0, 16.0):
        target = seg.seek_s - back_s
        if target <= 0:
            break
        cap.set(cv2.CAP_PROP_POS_MSEC, target * 1000.0)
        # The frame grabbed here lies before the segment if the seek behaved, so skipping
        # it loses nothing; if it lies inside, frames may have been skipped: seek earlier.
        if cap.grab() and cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 < seg.start_s - _BOUNDARY_EPS_S:
            return CvBackend(cap, live=False, clock_origin=0.0)
        log.debug(
            "%s: seek to %.3f s overshot segment %d; seeking earlier", path, target, seg.index
        )
    cap.release()
    return CvBackend(open_file_capture(path, threads=threads), live=False, clock_origin=0.0)


class _ParallelDecode:
    """Workers claim segments in order (at most `workers` ahead of the consumer) and fill
    one bounded queue per segment; the consumer drains the queues in order."""

    def __init__(
        self, path: str, segments: list[Segment], fps: float | None, workers: int, buffer: int
    ) -> None:
        self._path = path
        self.segments = segments
        self._fps = fps
        self._workers = max(1, min(workers, len(segments)))
        per_segment = max(2, buffer // self._workers)
        self._queues: list[queue.Queue[object]] = [
            queue.Queue(maxsize=per_segment) for _ in segments
        ]
        self._threads_per_decoder = max(1, (os.cpu_count() or 1) // self._workers)
        self._cond = threading.Condition()
        self._next = 0  # next segment to claim
        self._consumed = 0  # segments fully handed to the consumer
        self._stop = threading.Event()
        self.decoded = 0  # frames decoded inside their own segment

    def frames(self) -> Generator[Frame, None, None]:
        threads = [
            threading.Thread(target=self._work, name=f"decode {self._path} #{i}", daemon=True)
            for i in range(self._workers)
        ]
        for t in threads:
            t.start()
        try:
            yield from self._merge()
        finally:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            for t in threads:
                t.join()

    def _merge(self) -> Iterator[Frame]:
        prev_ts: float | None = None
        index = 0
        for seg, q in zip(self.segments, self._queues):
            while True:
                item = q.get()
                if isinstance(item, _Failed):
                    raise item.error
                if isinstance(item, _SegmentEnd):
                    self.decoded += item.decoded
                    if item.last_timestamp is not None:
                        prev_ts = item.last_timestamp
                    break
                assert isinstance(item, _Decoded)
                keep = item.keep
                if keep is None:
                    keep = crosses_grid(prev_ts, item.timestamp, self._fps)
                if keep:
                    yield Frame(item.image, item.timestamp, index)
                    index += 1
            with self._cond:
                self._consumed = seg.index + 1
                self._cond.notify_all()

    def _claim(self) -> int | None:
        with self._cond:
            while True:
                if self._stop.is_set() or self._next >= len(self.segments):
                    return None
                # The window keeps memory bounded and guarantees the segment the consumer
                # waits for is always being decoded.
                if self._next < self._consumed + self._workers:
                    self._next += 1
                    return self._next - 1
                self._cond.wait(_POLL_S)

    def _put(self, q: queue.Queue[object], item: object) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        while (i := self._claim()) is not None:
            q = self._queues[i]
            try:
                self._decode(self.segments[i], q)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                self._put(q, _Failed(exc))
                return

    def _decode(self, seg: Segment, q: queue.Queue[object]) -> None:
        backend = _positioned_capture(self._path, seg, self._threads_per_decoder)
        prev: float | None = None
        count = 0
        try:
            while not self._stop.is_set():
                ts = backend.grab()
                if ts is None:
                    break
                if ts < seg.start_s - _BOUNDARY_EPS_S:
                    continue
                if seg.end_s is not None and ts >= seg.end_s - _BOUNDARY_EPS_S:
                    break
                keep = None if prev is None else crosses_grid(prev, ts, self._fps)
                prev = ts
                count += 1
                if keep is False:
                    continue
                image = backend.retrieve()
                if image is None:
                    continue
                if not self._put(q, _Decoded(ts, image, keep)):
                    return
        finally:
            backend.release()
        self._put(q, _SegmentEnd(prev, count))


def decode_file_parallel(
    path: str | os.PathLike[str],
    fps: float | None = None,
    workers: int = 3,
    *,
    buffer_frames: int = 16,
    use_ffprobe: bool = True,
) -> Iterator[Frame]:
    """Frames of a video file sampled at fps, decoded by `workers` threads, in order.

    Same frames, pixels, timestamps and indices as a single decoder. At most about
    buffer_frames decoded frames wait in memory. Keyframe boundaries come from ffprobe when
    present (use_ffprobe); otherwise the file is split evenly and each decoder starts at the
    keyframe before its piece. Raises SourceError at once if the file cannot be opened;
    a decoding error in a worker is re-raised in the consuming thread.
    """
    return _prepare(os.fspath(path), fps, workers, buffer_frames, use_ffprobe).frames()


def _prepare(
    path: str, fps: float | None, workers: int, buffer_frames: int, use_ffprobe: bool = True
) -> _ParallelDecode:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    open_file_capture(path).release()  # raise SourceError now, not at the first next()
    segments = plan_segments(path, workers, use_ffprobe=use_ffprobe)
    return _ParallelDecode(path, segments, fps, workers, buffer_frames)


class ParallelFileSource(Source):
    """A non-realtime file Source backed by decode_file_parallel."""

    def __init__(self, name: str, path: str, fps: float | None, options: CaptureOptions):
        super().__init__(name, SourceKind.FILE)
        self._path = path
        self._fps = fps
        self._options = options
        self._active: Generator[Frame, None, None] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[Frame | SourceEvent]:
        if self._closed:
            return
        workers = self._options.decode_workers
        decode = _prepare(self._path, self._fps, workers, self._options.buffer_frames)
        frames = self._active = decode.frames()
        yield self._event("opened", f"{len(decode.segments)} segments, {workers} decoders")
        for frame in frames:
            self._counters.captured = decode.decoded
            self._counters.sampled += 1
            self._counters.delivered += 1
            yield frame
        self._counters.captured = decode.decoded
        if not self._closed:
            yield from self._end_events(decode.decoded, *_container_length(self._path))

    def close(self) -> None:
        self._closed = True
        if self._active is not None:
            self._active.close()
