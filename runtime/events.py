"""Typed events that the Assistant yields; the TUI and the CLI consume nothing else."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass(frozen=True)
class Event:
    """Base class.

    `wall_time` (seconds since the epoch, as time.time()) is when the Assistant handed the
    event out: one Assistant's events carry non-decreasing wall_times in the order it hands
    them out (a clock stepped back repeats the last stamp). A SourceEvent "ended" is thus
    stamped when it reaches the consumer, after the events of the frames still in flight, not
    when the capture thread read the end. An event made outside an Assistant carries its
    creation time.
    """

    wall_time: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__.removesuffix("Event").lower()

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


E = TypeVar("E", bound=Event)


class EventClock:
    """Stamps events' wall_time as they are handed out, never below the previous stamp (events
    are made on other threads, and earlier, than they are handed out). Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._last = -math.inf
        self._lock = threading.Lock()

    def stamp(self, event: E) -> E:
        with self._lock:
            self._last = max(self._last, self._clock())
            now = self._last
        return dataclasses.replace(event, wall_time=now)

    def stamp_all(self, events: Iterable[E]) -> list[E]:
        return [self.stamp(e) for e in events]


@dataclass(frozen=True)
class NarrationEvent(Event):
    text: str  # what the model said after this frame
    frame_index: int  # the frame after which it spoke
    frame_timestamp: float  # that frame's timestamp in seconds


@dataclass(frozen=True)
class AnswerEvent(Event):
    question: str
    text: str
    frame_index: int  # the frame boundary at which the question was injected
    frame_timestamp: float


@dataclass(frozen=True)
class StatsEvent(Event):
    frames_captured: int
    frames_processed: int
    frames_dropped: int  # sampled frames skipped because inference fell behind
    stage_ms: dict[str, float]  # capture / preprocess / vision / prefill / decode, last frame
    kv_fill: float  # 0..1, fullest layer group
    kv_frames_fit: int  # frames the cache holds at capacity
    evictions: int
    fps_processed: float
    backend: str
    tokens_pruned: int = 0  # vision tokens not prefilled thanks to temporal pruning (if on)
    frames_skipped: int = 0  # near-duplicate frames not prefilled (skip_duplicate_frames)


@dataclass(frozen=True)
class SourceEvent(Event):
    status: str  # "opened" | "reconnecting" | "resumed" | "gap" | "ended" | "failed"
    source: str
    message: str = ""
    gap_seconds: float = 0.0


@dataclass(frozen=True)
class WarningEvent(Event):
    message: str
