"""The synthetic world's configuration and ground truth: what a stream is made of (frozen
dataclasses), independent of how the world generates or draws it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .grammar import COLOURS, EVENT_KINDS, NUMBERS, SHAPES, EventKind, QuestionKind

BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "textured", "noisy")
EDGE_MARGIN = 1.0  # px between a resting object's box and the frame edge


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes a stream; the defaults are the full demo world."""

    height: int = 64  # frame height in pixels
    width: int = 64  # frame width in pixels
    fps: float = 2.0  # frames per second; only timestamps use it, motion is per frame
    max_objects: int = 3  # most objects on screen at once (curriculum: start at 1)
    event_kinds: tuple[str, ...] = tuple(k.value for k in EVENT_KINDS)  # curriculum subset
    colours: tuple[str, ...] = COLOURS  # object colours used (subset of grammar.COLOURS)
    shapes: tuple[str, ...] = SHAPES  # object shapes used (subset of grammar.SHAPES)
    backgrounds: tuple[str, ...] = BACKGROUNDS  # background styles drawn per scene
    small_px: int = 16  # bounding-box side of a "small" object
    large_px: int = 22  # bounding-box side of a "large" object
    speed_px: tuple[float, float] = (7.0, 12.0)  # range of per-frame displacement when moving
    min_event_gap: int = 3  # frames between any two events, so narrations are attributable
    event_prob: float = 0.3  # chance an eligible frame starts a spontaneous event
    dark_level: float = 0.4  # brightness multiplier while the scene is dark
    shake_prob: float = 0.2  # chance a scene has camera shake
    shake_px: int = 2  # most pixels a shaken frame is displaced by
    noise_prob: float = 0.3  # chance a scene has sensor noise
    noise_sigma: float = 6.0  # std-dev of the per-frame Gaussian sensor noise (0-255 scale)
    question_prob: float = 0.1  # chance a frame carries a question (when one is well defined)
    # chance a frame in which exactly one object moves carries "what colour/shape is the
    # moving object?" (instead of a question_prob draw); 0: never, the default world's draws
    mover_questions: float = 0.0
    # chance the frame a move starts asks the same, when that object is the only one moving:
    # the frame where binding a new motion to its object is hardest (0: never)
    onset_questions: float = 0.0

    def __post_init__(self) -> None:
        kinds = {EventKind(k) for k in self.event_kinds}  # ValueError on unknown names
        problems = []
        if not 1 <= self.max_objects <= len(NUMBERS) - 1:
            problems.append(f"max_objects must be 1..{len(NUMBERS) - 1}")
        if not set(self.colours) <= set(COLOURS) or not self.colours:
            problems.append(f"colours must be a non-empty subset of {COLOURS}")
        if not set(self.shapes) <= set(SHAPES) or not self.shapes:
            problems.append(f"shapes must be a non-empty subset of {SHAPES}")
        if not set(self.backgrounds) <= set(BACKGROUNDS) or not self.backgrounds:
            problems.append(f"backgrounds must be a non-empty subset of {BACKGROUNDS}")
        if self.large_px + 2 * EDGE_MARGIN > min(self.height, self.width) / 2:
            problems.append("large_px must fit twice across the frame")
        if not 0 < self.speed_px[0] <= self.speed_px[1] < self.small_px:
            # Faster than its own size, an object could leave in the frame it starts moving.
            problems.append("speed_px must be (low, high) with 0 < low <= high < small_px")
        if not 0.0 <= self.mover_questions <= 1.0:
            problems.append("mover_questions must be a probability in [0, 1]")
        if not 0.0 <= self.onset_questions <= 1.0:
            problems.append("onset_questions must be a probability in [0, 1]")
        if self.min_event_gap < 1:
            problems.append("min_event_gap must be >= 1")
        if kinds & {EventKind.ENTER, EventKind.MOVE} and not kinds & {
            EventKind.STOP,
            EventKind.LEAVE,
        }:
            problems.append(
                "enter/move need stop or leave in event_kinds: motion must end in an event"
            )
        if problems:
            raise ValueError("invalid WorldConfig: " + "; ".join(problems))


def curriculum(stage: int) -> WorldConfig:
    """Configs from one clean object (stage 0) to the full world (stage >= 2)."""
    if stage <= 0:
        return WorldConfig(
            max_objects=1,
            event_kinds=("enter", "leave", "move", "stop"),
            backgrounds=("plain",),
            shake_prob=0.0,
            noise_prob=0.0,
        )
    if stage == 1:
        return WorldConfig(
            max_objects=2,
            event_kinds=("enter", "leave", "move", "stop", "recolour", "dim", "brighten"),
            backgrounds=("plain", "gradient"),
            shake_prob=0.0,
            noise_prob=0.1,
        )
    return WorldConfig()


@dataclass(frozen=True)
class ObjectState:
    """One visible object in one frame."""

    object_id: int  # unique within a stream; narration names objects by colour + shape
    shape: str
    colour: str
    size: str  # "small" | "large"
    size_px: int  # side of the bounding box; every shape is drawn to fill it
    x: float  # bounding-box centre in pixel-index coordinates (column), before camera shake
    y: float  # likewise the row
    vx: float  # displacement since the previous frame, pixels per frame
    vy: float
    moving: bool
    fully_visible: bool  # the whole bounding box is inside the frame


@dataclass(frozen=True)
class FrameState:
    """Ground truth for one frame."""

    index: int
    time_s: float
    scene_id: int  # increments at every cut
    background: str  # one of BACKGROUNDS
    brightness: float  # 1.0, or config.dark_level while dark
    shake: tuple[int, int]  # (dx, dy) pixels the camera moved this frame
    noise_sigma: float  # sensor noise std-dev this frame; 0 when clean
    objects: tuple[ObjectState, ...]

    @property
    def dark(self) -> bool:
        return self.brightness < 1.0

    @property
    def clean(self) -> bool:
        """Pixels are exact: full brightness, no shake, no noise."""
        return not self.dark and self.shake == (0, 0) and self.noise_sigma == 0.0


@dataclass(frozen=True)
class Event:
    """Something that happened at a frame, with its one narration sentence."""

    frame_index: int  # the first frame in which the change is visible
    time_s: float
    kind: EventKind
    text: str
    object_id: int | None = None  # None for global events (dim, brighten, cut)
    colour: str | None = None  # the object's colour before the event
    shape: str | None = None
    direction: str | None = None  # enter: side it came from; move: where it is going
    new_colour: str | None = None  # recolour only

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame_index": self.frame_index,
            "time_s": self.time_s,
            "kind": self.kind.value,
            "text": self.text,
            "object_id": self.object_id,
            "colour": self.colour,
            "shape": self.shape,
            "direction": self.direction,
            "new_colour": self.new_colour,
        }


@dataclass(frozen=True)
class Question:
    """A question about the frame it is asked at, with its single correct answer."""

    frame_index: int  # asked after this frame was seen
    time_s: float
    kind: QuestionKind
    text: str
    answer: str
    object_id: int | None = None  # the object it is about, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame_index": self.frame_index,
            "time_s": self.time_s,
            "kind": self.kind.value,
            "text": self.text,
            "answer": self.answer,
            "object_id": self.object_id,
        }


@dataclass(frozen=True)
class StreamStep:
    """One frame of `iter_stream`."""

    image: np.ndarray  # (height, width, 3) uint8 RGB
    state: FrameState
    events: tuple[Event, ...]  # events whose frame_index is this frame (at most one)
    questions: tuple[Question, ...]  # questions asked after this frame


@dataclass(frozen=True)
class Stream:
    """A whole generated stream held in memory."""

    seed: int
    config: WorldConfig
    fps: float
    frames: np.ndarray  # (T, height, width, 3) uint8 RGB
    states: tuple[FrameState, ...]
    events: tuple[Event, ...]
    questions: tuple[Question, ...]

    @property
    def num_frames(self) -> int:
        return len(self.states)

    def narrations(self) -> list[tuple[float, str]]:
        """(time_s, text) of every event: the perfect narrator's output."""
        return [(e.time_s, e.text) for e in self.events]
