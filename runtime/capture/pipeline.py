"""An overlapped pipeline: each stage runs on its own thread, joined by small bounded queues.

While stage 2 works on item n, stage 1 already works on item n+1, so throughput approaches
the slowest stage instead of the sum of all stages (as long as the stages release the GIL:
OpenCV, onnxruntime and sleeping all do). Bounded queues keep memory and latency small.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_POLL_S = 0.05


class _Skip:
    def __repr__(self) -> str:
        return "SKIP"


SKIP: Any = _Skip()
"""Return this from a stage to drop the item (e.g. a filter stage)."""


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline."""

    name: str  # key in stats and stage_ms(), e.g. "preprocess"
    fn: Callable[[Any], Any]  # item -> result (or SKIP to drop the item)
    passthrough: tuple[type, ...] = ()  # items of these types skip fn and flow on unchanged


@dataclass(frozen=True)
class StageStats:
    """Timing of one stage, for StatsEvent.stage_ms."""

    name: str  # the stage's name
    items: int  # items it has processed (passthrough items not counted)
    last_ms: float  # time fn took on the latest item
    avg_ms: float  # exponential moving average of fn's time (weight 0.1 on the latest)
    total_ms: float  # time spent in fn since start


@dataclass(frozen=True)
class _End:
    pass


@dataclass(frozen=True)
class _Error:
    stage: str
    error: BaseException


_END = _End()


class _Timer:
    """Mutable per-stage timing, written by the stage thread, read via snapshot()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._items = 0
        self._last = 0.0
        self._avg = 0.0
        self._total = 0.0

    def add(self, ms: float) -> None:
        with self._lock:
            self._avg = ms if self._items == 0 else 0.9 * self._avg + 0.1 * ms
            self._items += 1
            self._last = ms
            self._total += ms

    def snapshot(self) -> StageStats:
        with self._lock:
            return StageStats(self.name, self._items, self._last, self._avg, self._total)


class Pipeline:
    """Run items through stages concurrently; outputs come back in input order.

    >>> pipe = Pipeline([Stage("double", lambda x: 2 * x), Stage("inc", lambda x: x + 1)])
    >>> list(pipe.run(range(3)))
    [1, 3, 5]

    The input iterable is consumed on its own thread too (it may be a capture source). An
    exception in any stage, or in the input, stops the pipeline and is re-raised by run()'s
    iterator in the consuming thread. Leaving the loop early (break, close) shuts it down.
    """

    def __init__(self, stages: Sequence[Stage], *, queue_size: int = 2) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self._stages = list(stages)
        self._queue_size = max(1, queue_size)
        self._timers = {s.name: _Timer(s.name) for s in stages}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = False

    # ------------------------------------------------------------------------------ stats

    def stats(self) -> dict[str, StageStats]:
        return {name: timer.snapshot() for name, timer in self._timers.items()}

    def stage_ms(self, *, average: bool = False) -> dict[str, float]:
        """{stage: ms per item}, latest item (or moving average) - the StatsEvent shape."""
        return {n: (s.avg_ms if average else s.last_ms) for n, s in self.stats().items()}

    # ------------------------------------------------------------------------------ running

    def run(self, items: Iterable[Any]) -> Iterator[Any]:
        """Start the threads and iterate over the last stage's outputs."""
        if self._running:
            raise RuntimeError("this pipeline is already running; make another one")
        self._running = True
        self._stop.clear()
        queues: list[queue.Queue[Any]] = [
            queue.Queue(maxsize=self._queue_size) for _ in range(len(self._stages) + 1)
        ]
        self._threads = [
            threading.Thread(target=self._feed, args=(items, queues[0]), name="pipeline feed")
        ]
        for stage, inbox, outbox in zip(self._stages, queues, queues[1:]):
            self._threads.append(
                threading.Thread(
                    target=self._serve,
                    args=(stage, inbox, outbox),
                    name=f"pipeline {stage.name}",
                )
            )
        for t in self._threads:
            t.daemon = True
            t.start()
        return self._collect(queues[-1])

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop all stages and wait for them (a stage mid-call finishes that call first).

        The feed thread may be blocked inside the input iterator (a live source waiting for
        a frame); it is not waited for beyond timeout_s: close the source to release it.
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    log.warning("pipeline: thread %r still busy after close()", t.name)
        self._threads = []
        self._running = False

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _collect(self, outbox: queue.Queue[Any]) -> Iterator[Any]:
        try:
            while True:
                item = self._get(outbox)  # _END too once close() ran on another thread
                if item is _END:
                    return
                if isinstance(item, _Error):
                    _note(item.error, f"raised in pipeline stage '{item.stage}'")
                    raise item.error
                yield item
        finally:
            self.close()

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        # Poll so that a stage blocked on a full queue notices close().
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue[Any]) -> Any:
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _END

    def _feed(self, items: Iterable[Any], outbox: queue.Queue[Any]) -> None:
        try:
            for item in items:
                if not self._put(outbox, item):
                    return
        except BaseException as exc:  # re-raised by the consumer
            self._put(outbox, _Error("input", exc))
            return
        self._put(outbox, _END)

    def _serve(self, stage: Stage, inbox: queue.Queue[Any], outbox: queue.Queue[Any]) -> None:
        timer = self._timers[stage.name]
        while True:
            item = self._get(inbox)
            if item is _END or isinstance(item, _Error):
                self._put(outbox, item)  # forward end / upstream failure, then stop
                return
            if stage.passthrough and isinstance(item, stage.passthrough):
                if not self._put(outbox, item):
                    return
                continue
            start = time.perf_counter()
            try:
                result = stage.fn(item)
            except BaseException as exc:  # re-raised by the consumer
                log.debug("pipeline stage %s failed: %r", stage.name, exc)
                self._put(outbox, _Error(stage.name, exc))
                return
            timer.add((time.perf_counter() - start) * 1000.0)
            if result is SKIP:
                continue
            if not self._put(outbox, result):
                return


def _note(error: BaseException, text: str) -> None:
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None and text not in getattr(error, "__notes__", ()):
        add_note(text)
