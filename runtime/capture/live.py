"""Live capture: a thread reads the source and keeps only the newest sampled frame.

A camera or stream produces frames whether or not anyone is ready for them; queueing them
would make the narrator describe the past. So the capture thread overwrites one slot, counts
what it overwrote as dropped, and reopens the source with backoff when it fails, reporting
the outage as SourceEvents instead of raising.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from ..errors import SourceError
from ..events import SourceEvent
from ..frames import Frame
from .sources import (
    BackoffConfig,
    CaptureBackend,
    FrameSampler,
    Source,
    SourceKind,
)

log = logging.getLogger(__name__)

# How often a waiting consumer re-checks for close(); close() also notifies, so this is a
# safety net rather than a latency.
_POLL_S = 0.5


class LiveSource(Source):
    """Capture thread + newest-frame slot + reconnection.

    reopen: makes a fresh backend after a failure; None marks a finite source (a file, image
    folder or recorded video URL replayed in real time) that ends instead of reconnecting.
    pace: sleep so frames come out at their timestamps' wall-clock rate (file as camera).
    """

    def __init__(
        self,
        name: str,
        kind: SourceKind,
        backend: CaptureBackend,
        *,
        fps: float | None,
        reopen: Callable[[], CaptureBackend] | None,
        backoff: BackoffConfig | None = None,
        pace: bool = False,
        close_timeout_s: float = 12.0,
    ) -> None:
        super().__init__(name, kind)
        self._backend: CaptureBackend | None = backend
        self._fps = fps
        self._reopen = reopen
        self._backoff = backoff or BackoffConfig()
        self._pace = pace
        self._close_timeout_s = close_timeout_s
        self._cond = threading.Condition()
        # Events in order, plus at most one Frame: the newest not yet taken.
        self._pending: deque[Frame | SourceEvent] = deque()
        self._stop = threading.Event()
        self._done = False  # capture thread has exited
        self._thread = threading.Thread(target=self._run, name=f"capture {name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- consumer

    def __iter__(self) -> Iterator[Frame | SourceEvent]:
        while True:
            with self._cond:
                while not self._pending and not self._done and not self._stop.is_set():
                    self._cond.wait(_POLL_S)
                if self._stop.is_set() or not self._pending:
                    return
                item = self._pending.popleft()
                if isinstance(item, Frame):
                    self._counters.delivered += 1
            yield item

    def interrupt(self) -> None:
        """End the iteration and the capture thread soon, from any thread; the capture
        thread releases the device itself (no join here)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop capturing; waits for the thread to release the device (bounded)."""
        self.interrupt()
        if self._thread is not threading.current_thread():
            self._thread.join(self._close_timeout_s)
            if self._thread.is_alive():
                # Blocked inside an open or read; it exits when that times out.
                log.warning("%s: capture thread still busy after close(); leaving it", self.name)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ----------------------------------------------------------------------------- capture

    def _publish(self, item: Frame | SourceEvent) -> None:
        with self._cond:
            if isinstance(item, Frame):
                stale = [old for old in self._pending if isinstance(old, Frame)]
                for old in stale:
                    self._pending.remove(old)
                    self._counters.dropped += 1
            self._pending.append(item)
            self._cond.notify_all()
        if isinstance(item, SourceEvent):
            log.info("%s: %s %s", self.name, item.status, item.message)

    def _run(self) -> None:
        try:
            self._capture()
        except Exception as exc:  # a capture bug must not kill the process
            log.exception("%s: capture thread failed", self.name)
            self._publish(self._event("failed", f"capture stopped: {exc!r}"))
        finally:
            if self._backend is not None:
                self._release(self._backend)
                self._backend = None
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _capture(self) -> None:
        assert self._backend is not None
        self._publish(self._event("opened", self._backend.describe()))
        sampler = FrameSampler(self._fps)
        counters = self._counters
        last_frame_at = time.monotonic()
        outage_since: float | None = None  # time of the last frame before an outage
        pace_origin: tuple[float, float] | None = None  # (first timestamp, its wall time)

        while not self._stop.is_set():
            ts = self._grab()
            if ts is None:
                if self._stop.is_set():
                    return
                if self._reopen is None:
                    for event in self._backend_end_events(self._backend):
                        self._publish(event)
                    return
                if outage_since is None:
                    outage_since = last_frame_at
                    counters.reconnects += 1
                    self._publish(
                        self._event("reconnecting", "no frames from source; reopening with backoff")
                    )
                if not self._reconnect(outage_since):
                    return
                continue

            now = time.monotonic()
            if outage_since is not None:
                gap = now - outage_since
                self._publish(self._event("resumed", f"frames again after {gap:.1f} s", gap))
                outage_since = None
            last_frame_at = now
            counters.captured += 1

            if self._pace:
                if pace_origin is None:
                    pace_origin = (ts, now)
                delay = pace_origin[1] + (ts - pace_origin[0]) - now
                if delay > 0 and self._stop.wait(delay):
                    return
            if not sampler.take(ts):
                continue
            assert self._backend is not None
            image = self._backend.retrieve()
            if image is None:
                continue
            self._publish(Frame(image, ts, counters.sampled))
            counters.sampled += 1

    def _grab(self) -> float | None:
        assert self._backend is not None
        try:
            return self._backend.grab()
        except Exception as exc:  # treated like a dropped stream
            log.warning("%s: read failed: %r", self.name, exc)
            return None

    def _reconnect(self, outage_since: float) -> bool:
        """Reopen with exponential backoff; False if closed or given up (after "failed")."""
        assert self._reopen is not None
        if self._backend is not None:
            self._release(self._backend)
            self._backend = None
        policy = self._backoff
        delay = policy.initial_s
        attempt = 0
        while not self._stop.wait(delay):
            attempt += 1
            try:
                self._backend = self._reopen()
                log.info("%s: reopened after %d attempt(s)", self.name, attempt)
                return True
            except SourceError as exc:
                log.info("%s: reopen attempt %d failed: %s", self.name, attempt, exc)
            except Exception as exc:  # keep retrying whatever went wrong
                log.warning("%s: reopen attempt %d crashed: %r", self.name, attempt, exc)
            down_for = time.monotonic() - outage_since
            if policy.give_up_after_s is not None and down_for >= policy.give_up_after_s:
                self._publish(
                    self._event(
                        "failed",
                        f"gave up after {down_for:.0f} s and {attempt} attempts; check the "
                        "device or stream and restart",
                        down_for,
                    )
                )
                return False
            delay = min(delay * policy.factor, policy.max_s)
        return False

    def _release(self, backend: CaptureBackend) -> None:
        try:
            backend.release()
        except Exception as exc:  # releasing a dead device may fail; ignore
            log.debug("%s: release failed: %r", self.name, exc)
