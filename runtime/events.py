"""Typed events that the Assistant yields; the TUI and the CLI consume nothing else."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Base class; `wall_time` is when the event was created (time.time())."""

    wall_time: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__.removesuffix("Event").lower()

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


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
