"""Typed messages that worker threads post to the app.

Workers never touch widgets: they post one of these (post_message is thread-safe) and the
app's handlers update the screen on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from textual.message import Message

from onsight.runtime.events import (
    AnswerEvent,
    Event,
    NarrationEvent,
    SourceEvent,
    StatsEvent,
    WarningEvent,
)

FailureStage = Literal["bundle", "source", "engine"]


@dataclass(frozen=True)
class EngineInfo:
    """What the stats panel shows about the loaded engine (fixed for its lifetime)."""

    name: str  # bundle name
    backend: str  # e.g. "onnxruntime:cpu", "tensorrt"
    device: str  # "cpu" | "cuda" | "?"
    keep_ratio: float | None  # Mixture-of-Depths keep ratio of vision tokens; None if unknown
    fps: float | None  # sampling rate the source is opened with


# Message subclasses are dataclasses: Textual's Message.__init__ only calls __post_init__,
# which the generated __init__ also calls, so the fields and Textual's bookkeeping coexist.
# eq=False keeps identity hashing, which Textual's queues rely on.


@dataclass(eq=False)
class EngineLoaded(Message):
    info: EngineInfo


@dataclass(eq=False)
class SourceOpened(Message):
    name: str  # the spec as given (or the demo video's path)


@dataclass(eq=False)
class Narrated(Message):
    event: NarrationEvent


@dataclass(eq=False)
class Answered(Message):
    event: AnswerEvent


@dataclass(eq=False)
class SourceChanged(Message):
    event: SourceEvent


@dataclass(eq=False)
class StatsUpdated(Message):
    event: StatsEvent


@dataclass(eq=False)
class Warned(Message):
    text: str


@dataclass(eq=False)
class Status(Message):
    """A quiet progress note for the log, e.g. "loading engine ..."."""

    text: str


@dataclass(eq=False)
class NarrationFailed(Message):
    stage: FailureStage  # what failed: loading the bundle, opening/reading the source, inference
    text: str  # the error's message (it already says what to do)
    exit_code: int  # what `onsight run` exits with if the user quits here
    offer_demo: bool  # the source was a camera that is not there: offer the demo video


@dataclass(eq=False)
class NarrationStopped(Message):
    """The narrate worker has exited (source ended, failed, or the app is closing)."""


@dataclass(eq=False)
class Terminated(Message):
    """SIGTERM or SIGHUP: engine, source and transcript are closed; exit with this code."""

    exit_code: int


@dataclass(eq=False)
class SnapshotSaved(Message):
    image: Path | None  # None when no frame had arrived yet
    transcript: Path


@dataclass(eq=False)
class SnapshotFailed(Message):
    text: str


def message_for(event: Event) -> Message:
    """The message a runtime event becomes on its way to the screen."""
    if isinstance(event, NarrationEvent):
        return Narrated(event)
    if isinstance(event, AnswerEvent):
        return Answered(event)
    if isinstance(event, SourceEvent):
        return SourceChanged(event)
    if isinstance(event, StatsEvent):
        return StatsUpdated(event)
    if isinstance(event, WarningEvent):
        return Warned(event.message)
    return Warned(f"unknown event {event.kind}")
