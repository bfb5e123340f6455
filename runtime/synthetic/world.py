"""A seeded procedural video world with exact per-frame ground truth.

Design constraints come from the narrator downstream: its vision encoder sees one frame at a
time as 1 + 3x3 pooled tokens, so objects are large, move at least a third of a grid cell per
frame, at most a few are on screen, and events are spaced `min_event_gap` frames apart so each
narration belongs to exactly one frame. Motion is planned when it starts (where it stops or
when it leaves), which is what lets the planner keep every event - planned or spontaneous -
spaced out and every trajectory collision-free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from .grammar import (
    COLOURS,
    DIRECTIONS,
    EVENT_KINDS,
    NUMBERS,
    POSITIONS,
    SHAPES,
    SIZES,
    EventKind,
    QuestionKind,
    narrate,
    question_text,
)

log = logging.getLogger(__name__)

BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "textured", "noisy")

# RGB. Every colour has a channel >= 200 and backgrounds stay <= _BG_MAX, so at full brightness
# an object's exact colour never occurs in the background (tests mask objects by exact colour).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (170, 60, 220),
}
_BG_MAX = 150

_UNIT_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_INWARD = {"left": "right", "right": "left", "top": "down", "bottom": "up"}  # side -> direction

# Relative odds of spontaneous events; planned ones (stop, leave) follow from enter and move.
# Brighten is likely once dark so dark spells stay short; cuts are rare so scenes last.
_WEIGHTS = {
    EventKind.ENTER: 3.0,
    EventKind.MOVE: 2.5,
    EventKind.RECOLOUR: 1.5,
    EventKind.DIM: 0.6,
    EventKind.BRIGHTEN: 4.0,
    EventKind.CUT: 0.4,
}
_EDGE_MARGIN = 1.0  # px between a resting object's box and the frame edge
_SEPARATION = 3.0  # px kept between any two objects' boxes so they never touch or occlude
_CELL_MARGIN = 3.0  # px an object's centre must keep from a 3x3 cell border to be "where"-asked


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
        if self.large_px + 2 * _EDGE_MARGIN > min(self.height, self.width) / 2:
            problems.append("large_px must fit twice across the frame")
        if not 0 < self.speed_px[0] <= self.speed_px[1] < self.small_px:
            # Faster than its own size, an object could leave in the frame it starts moving.
            problems.append("speed_px must be (low, high) with 0 < low <= high < small_px")
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


# --------------------------------------------------------------------------------------------
# Dynamics


@dataclass
class _Body:
    """An object's identity and its planned straight-line motion (mutable, internal)."""

    oid: int
    shape: str
    colour: str
    size: str
    size_px: int
    start_frame: int  # frame at which the object is at (start_x, start_y)
    start_x: float
    start_y: float
    vx: float = 0.0
    vy: float = 0.0
    stop_frame: int | None = None  # first frame with no displacement (a "stop" event)
    exit_frame: int | None = None  # first frame fully outside (a "leave" event)

    def pos(self, f: int) -> tuple[float, float]:
        k = f - self.start_frame
        if self.stop_frame is not None:
            k = min(k, self.stop_frame - 1 - self.start_frame)
        return self.start_x + self.vx * k, self.start_y + self.vy * k

    def moving_at(self, f: int) -> bool:
        return (self.vx != 0.0 or self.vy != 0.0) and (
            self.stop_frame is None or f < self.stop_frame
        )

    def track(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised pos() and presence over `frames`."""
        k = frames - self.start_frame
        if self.stop_frame is not None:
            k = np.minimum(k, self.stop_frame - 1 - self.start_frame)
        present = frames < self.exit_frame if self.exit_frame is not None else np.ones_like(k, bool)
        return self.start_x + self.vx * k, self.start_y + self.vy * k, present

    def pending(self, f: int) -> list[int]:
        return [r for r in (self.stop_frame, self.exit_frame) if r is not None and r > f]


@dataclass
class _Scene:
    scene_id: int
    background: str
    image: np.ndarray  # padded background, uint8 RGB
    shaky: bool
    noise_sigma: float
    bodies: list[_Body] = field(default_factory=list)


class _World:
    """Steps the world one frame at a time; all randomness flows from one seed."""

    def __init__(self, seed: int, config: WorldConfig) -> None:
        self.cfg = config
        self.kinds = {EventKind(k) for k in config.event_kinds}
        # Separate streams so pixel nuisances and question sampling never perturb the plot:
        # the same seed tells the same story whatever is asked or how noisy it is.
        self.rng, self.pixel_rng, self.question_rng = np.random.default_rng(seed).spawn(3)
        self.next_oid = 0
        self.last_event = -config.min_event_gap  # frame 0 is the scene's opening, never an event
        self.brightness = 1.0
        self.renderer = _Renderer(config, self.pixel_rng)
        self.scene = self._new_scene(0)

    # ---- scene and object creation ----

    def _new_scene(self, scene_id: int) -> _Scene:
        cfg, rng = self.cfg, self.rng
        kind = str(rng.choice(cfg.backgrounds))
        scene = _Scene(
            scene_id=scene_id,
            background=kind,
            image=self.renderer.background(kind, rng),
            shaky=bool(rng.random() < cfg.shake_prob),
            noise_sigma=float(cfg.noise_sigma if rng.random() < cfg.noise_prob else 0.0),
        )
        # Resting objects leave only by moving off or by a cut; where the curriculum allows
        # neither, an opening cast would sit there forever and block every entrance.
        removable = {EventKind.MOVE, EventKind.LEAVE} <= self.kinds or EventKind.CUT in self.kinds
        for _ in range(int(rng.integers(0, cfg.max_objects + 1)) if removable else 0):
            body = self._place_resting(scene.bodies)
            if body is not None:
                scene.bodies.append(body)
        return scene

    def _new_identity(self, bodies: list[_Body]) -> tuple[str, str] | None:
        used = {(b.colour, b.shape) for b in bodies}
        free = [(c, s) for c in self.cfg.colours for s in self.cfg.shapes if (c, s) not in used]
        if not free:
            return None
        return free[int(self.rng.integers(len(free)))]

    def _size(self) -> tuple[str, int]:
        i = int(self.rng.integers(2))
        return SIZES[i], (self.cfg.small_px, self.cfg.large_px)[i]

    def _place_resting(self, bodies: list[_Body]) -> _Body | None:
        identity = self._new_identity(bodies)
        if identity is None:
            return None
        size, px = self._size()
        lo = px / 2 + _EDGE_MARGIN
        for _ in range(30):
            x = float(self.rng.uniform(lo, self.cfg.width - lo))
            y = float(self.rng.uniform(lo, self.cfg.height - lo))
            if all(not _overlap(x, y, px, *b.pos(0), b.size_px) for b in bodies):
                self.next_oid += 1
                return _Body(self.next_oid, identity[1], identity[0], size, px, 0, x, y)
        return None

    # ---- planning ----

    def _pending(self, f: int, exclude: _Body | None = None) -> list[int]:
        return [r for b in self.scene.bodies if b is not exclude for r in b.pending(f)]

    def _fully_inside(self, x: float, y: float, px: int) -> bool:
        h = px / 2 + _EDGE_MARGIN
        return h <= x <= self.cfg.width - h and h <= y <= self.cfg.height - h

    def _outside(self, x: float, y: float, px: int) -> bool:
        h = px / 2
        return x + h <= 0 or x - h >= self.cfg.width or y + h <= 0 or y - h >= self.cfg.height

    def _plan(self, f: int, body: _Body) -> bool:
        """Give a moving `body` (start, velocity set) a stop or exit frame; False if none fits.

        A candidate end must be `min_event_gap` from now and from every other planned event,
        and the whole trajectory must keep clear of every other object's planned track.
        """
        gap, pending = self.cfg.min_event_gap, self._pending(f, exclude=body)
        options: list[tuple[EventKind, int]] = []
        g = f
        body.stop_frame = body.exit_frame = None
        while True:
            g += 1
            if self._outside(*body.pos(g), body.size_px):
                options.append((EventKind.LEAVE, g))
                break
            # Stopping at g leaves the object where it was at g - 1.
            if g - f >= gap and self._fully_inside(*body.pos(g - 1), body.size_px):
                options.append((EventKind.STOP, g))
        options = [
            (kind, g)
            for kind, g in options
            if kind in self.kinds and g - f >= gap and all(abs(g - r) >= gap for r in pending)
        ]
        leave_bias = 0.3 + 0.5 * (len(self.scene.bodies) - 1) / max(1, self.cfg.max_objects)
        self.rng.shuffle(options)
        if self.rng.random() < leave_bias:
            options.sort(key=lambda o: o[0] is not EventKind.LEAVE)  # stable: leave first
        for kind, g in options:
            body.stop_frame, body.exit_frame = (g, None) if kind is EventKind.STOP else (None, g)
            if self._clear(f, body):
                return True
        body.stop_frame = body.exit_frame = None
        return False

    def _clear(self, f: int, body: _Body) -> bool:
        others = [b for b in self.scene.bodies if b is not body]
        if not others:
            return True
        ends = [r for b in self.scene.bodies for r in (b.stop_frame, b.exit_frame) if r is not None]
        frames = np.arange(f, max(ends, default=f) + 2)  # past the last end all is at rest
        x, y, present = body.track(frames)
        for o in others:
            ox, oy, opresent = o.track(frames)
            reach = (body.size_px + o.size_px) / 2 + _SEPARATION
            hit = (np.abs(x - ox) < reach) & (np.abs(y - oy) < reach) & present & opresent
            if hit.any():
                return False
        return True

    # ---- events ----

    def _event(self, f: int, kind: EventKind, body: _Body | None = None, **extra: str) -> Event:
        colour, shape = (body.colour, body.shape) if body is not None else (None, None)
        return Event(
            frame_index=f,
            time_s=f / self.cfg.fps,
            kind=kind,
            text=narrate(kind, colour, shape, extra.get("direction"), extra.get("new_colour")),
            object_id=body.oid if body is not None else None,
            colour=colour,
            shape=shape,
            direction=extra.get("direction"),
            new_colour=extra.get("new_colour"),
        )

    def _planned_events(self, f: int) -> list[Event]:
        events = []
        for body in list(self.scene.bodies):
            if body.stop_frame == f:
                x, y = body.pos(f)
                body.start_frame, body.start_x, body.start_y = f, x, y
                body.vx = body.vy = 0.0
                body.stop_frame = None
                events.append(self._event(f, EventKind.STOP, body))
            elif body.exit_frame == f:
                self.scene.bodies.remove(body)
                events.append(self._event(f, EventKind.LEAVE, body))
        return events

    def _speed(self) -> float:
        return float(self.rng.uniform(*self.cfg.speed_px))

    def _try_enter(self, f: int) -> Event | None:
        cfg, rng = self.cfg, self.rng
        if len(self.scene.bodies) >= cfg.max_objects:
            return None
        for _ in range(6):
            identity = self._new_identity(self.scene.bodies)
            if identity is None:
                return None
            size, px = self._size()
            side = str(rng.choice(("left", "right", "top", "bottom")))
            ux, uy = _UNIT_VECTORS[_INWARD[side]]
            # At least half the object is visible on its first frame, so the entry is seen.
            depth = float(rng.uniform(0.5, 1.0)) * px - px / 2
            lo = px / 2 + _EDGE_MARGIN
            if ux:
                x = depth if ux > 0 else cfg.width - depth
                y = float(rng.uniform(lo, cfg.height - lo))
            else:
                x = float(rng.uniform(lo, cfg.width - lo))
                y = depth if uy > 0 else cfg.height - depth
            v = self._speed()
            body = _Body(
                self.next_oid + 1, identity[1], identity[0], size, px, f, x, y, ux * v, uy * v
            )
            self.scene.bodies.append(body)
            if self._plan(f, body):
                self.next_oid += 1
                return self._event(f, EventKind.ENTER, body, direction=side)
            self.scene.bodies.remove(body)
        return None

    def _try_move(self, f: int) -> Event | None:
        resting = [
            b
            for b in self.scene.bodies
            if not b.moving_at(f) and self._fully_inside(*b.pos(f), b.size_px)
        ]
        self.rng.shuffle(resting)
        for body in resting:
            x, y = body.pos(f)
            for direction in self.rng.permutation(DIRECTIONS):
                ux, uy = _UNIT_VECTORS[str(direction)]
                v = self._speed()
                # Anchored one frame back so the object has already moved on the event frame.
                body.start_frame, body.start_x, body.start_y = f - 1, x, y
                body.vx, body.vy = ux * v, uy * v
                if self._plan(f, body):
                    return self._event(f, EventKind.MOVE, body, direction=str(direction))
            body.start_frame, body.start_x, body.start_y, body.vx, body.vy = f, x, y, 0.0, 0.0
        return None

    def _try_recolour(self, f: int) -> Event | None:
        bodies = [b for b in self.scene.bodies if self._fully_inside(*b.pos(f), b.size_px)]
        if not bodies:
            return None
        body = bodies[int(self.rng.integers(len(bodies)))]
        used = {(b.colour, b.shape) for b in self.scene.bodies}
        free = [c for c in self.cfg.colours if (c, body.shape) not in used]
        if not free:
            return None
        new = free[int(self.rng.integers(len(free)))]
        event = self._event(f, EventKind.RECOLOUR, body, new_colour=new)
        body.colour = new
        return event

    def _try_global(self, f: int, kind: EventKind) -> Event | None:
        if kind is EventKind.DIM and self.brightness == 1.0:
            self.brightness = self.cfg.dark_level
        elif kind is EventKind.BRIGHTEN and self.brightness < 1.0:
            self.brightness = 1.0
        elif kind is EventKind.CUT and not self._pending(f):
            self.scene = self._new_scene(self.scene.scene_id + 1)
            self.brightness = 1.0  # a new scene opens lit
        else:
            return None
        return self._event(f, kind)

    def _spontaneous(self, f: int) -> Event | None:
        gap = self.cfg.min_event_gap
        if f - self.last_event < gap or any(abs(r - f) < gap for r in self._pending(f)):
            return None
        if self.rng.random() >= self.cfg.event_prob:
            return None
        weights = {k: w for k, w in _WEIGHTS.items() if k in self.kinds}
        if not self.scene.bodies and EventKind.ENTER in weights:
            weights[EventKind.ENTER] *= 3.0  # an empty stage should not stay empty for long
        while weights:
            kinds = list(weights)
            p = np.array([weights[k] for k in kinds])
            kind = kinds[int(self.rng.choice(len(kinds), p=p / p.sum()))]
            del weights[kind]
            if kind is EventKind.ENTER:
                event = self._try_enter(f)
            elif kind is EventKind.MOVE:
                event = self._try_move(f)
            elif kind is EventKind.RECOLOUR:
                event = self._try_recolour(f)
            else:
                event = self._try_global(f, kind)
            if event is not None:
                return event
        return None

    # ---- one frame ----

    def step(self, f: int) -> StreamStep:
        events = self._planned_events(f) if f > 0 else []
        if not events and f > 0:
            event = self._spontaneous(f)
            events = [event] if event is not None else []
        if events:
            self.last_event = f
        state = self._state(f)
        image = self.renderer.render(state, self.scene.image, self.scene.shaky)
        questions = self._ask(state)
        return StreamStep(image, state, tuple(events), questions)

    def _state(self, f: int) -> FrameState:
        cfg = self.cfg
        objects = []
        for b in self.scene.bodies:
            x, y = b.pos(f)
            if self._outside(x, y, b.size_px):
                continue  # unreachable by construction (exit_frame removes it); kept as a guard
            moving = b.moving_at(f)
            h = b.size_px / 2
            objects.append(
                ObjectState(
                    object_id=b.oid,
                    shape=b.shape,
                    colour=b.colour,
                    size=b.size,
                    size_px=b.size_px,
                    x=x,
                    y=y,
                    vx=b.vx if moving else 0.0,
                    vy=b.vy if moving else 0.0,
                    moving=moving,
                    fully_visible=h <= x <= cfg.width - h and h <= y <= cfg.height - h,
                )
            )
        shake = (0, 0)
        if self.scene.shaky:
            dx, dy = self.pixel_rng.integers(-cfg.shake_px, cfg.shake_px + 1, size=2)
            shake = (int(dx), int(dy))
        return FrameState(
            index=f,
            time_s=f / cfg.fps,
            scene_id=self.scene.scene_id,
            background=self.scene.background,
            brightness=self.brightness,
            shake=shake,
            noise_sigma=self.scene.noise_sigma,
            objects=tuple(objects),
        )

    def _ask(self, state: FrameState) -> tuple[Question, ...]:
        rng = self.question_rng
        if rng.random() >= self.cfg.question_prob:
            return ()
        candidates = questions_for_state(state, self.cfg)
        if not candidates:
            return ()
        # Balance by kind, then by answer, so "yes"/"no" and rare kinds are not drowned out.
        by_kind: dict[QuestionKind, dict[str, list[Question]]] = {}
        for q in candidates:
            by_kind.setdefault(q.kind, {}).setdefault(q.answer, []).append(q)
        kinds = list(by_kind)
        answers = by_kind[kinds[int(rng.integers(len(kinds)))]]
        pool = list(answers.values())[int(rng.integers(len(answers)))]
        return (pool[int(rng.integers(len(pool)))],)


def _overlap(x1: float, y1: float, s1: int, x2: float, y2: float, s2: int) -> bool:
    reach = (s1 + s2) / 2 + _SEPARATION
    return abs(x1 - x2) < reach and abs(y1 - y2) < reach


# --------------------------------------------------------------------------------------------
# Questions


def _direction(o: ObjectState) -> str:
    if abs(o.vx) >= abs(o.vy):
        return "right" if o.vx > 0 else "left"
    return "down" if o.vy > 0 else "up"


def _cell(value: float, extent: int) -> int | None:
    """Index 0..2 of the third `value` falls in; None when too close to a border to be sure."""
    for border in (extent / 3, 2 * extent / 3):
        if abs(value - border) < _CELL_MARGIN:
            return None
    return min(2, int(value * 3 // extent))


def questions_for_state(state: FrameState, config: WorldConfig = WorldConfig()) -> list[Question]:
    """Every question with exactly one correct answer in `state`.

    None while an object is partly off screen: how many objects there are is then a matter
    of opinion. Questions name only shapes and colours in `config`, so "no" answers stay
    within what the curriculum stage has shown.
    """
    objects = state.objects
    if any(not o.fully_visible for o in objects):
        return []
    out: list[Question] = []

    def add(kind: QuestionKind, answer: str, o: ObjectState | None = None, **names: str) -> None:
        text = question_text(kind, names.get("colour"), names.get("shape"))
        oid = o.object_id if o is not None else None
        out.append(Question(state.index, state.time_s, kind, text, answer, oid))

    add(QuestionKind.COUNT, NUMBERS[len(objects)])
    add(QuestionKind.DARK, "yes" if state.dark else "no")
    for shape in config.shapes:
        same = [o for o in objects if o.shape == shape]
        if len(same) == 1:
            add(QuestionKind.COLOUR, same[0].colour, same[0], shape=shape)
    for colour in config.colours:
        same = [o for o in objects if o.colour == colour]
        if len(same) == 1:
            add(QuestionKind.SHAPE, same[0].shape, same[0], colour=colour)
    present = {(o.colour, o.shape) for o in objects}
    for colour in config.colours:
        for shape in config.shapes:
            if (colour, shape) not in present:
                add(QuestionKind.EXISTS, "no", colour=colour, shape=shape)
    for o in objects:
        names = {"colour": o.colour, "shape": o.shape}
        add(QuestionKind.EXISTS, "yes", o, **names)
        add(QuestionKind.MOVING, "yes" if o.moving else "no", o, **names)
        add(QuestionKind.SIZE, o.size, o, **names)
        if o.moving:
            add(QuestionKind.DIRECTION, _direction(o), o, **names)
        col, row = _cell(o.x, config.width), _cell(o.y, config.height)
        if col is not None and row is not None:
            add(QuestionKind.WHERE, POSITIONS[row * 3 + col], o, **names)
    return out


# --------------------------------------------------------------------------------------------
# Pixels


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _fit_unit_box(poly: np.ndarray) -> np.ndarray:
    """Scale uniformly and centre so the bounding box is centred and its longer side is 1."""
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    return (poly - (lo + hi) / 2) / (hi - lo).max()


# Polygons in a unit box centred at 0, so a shape's bounding-box centre is the object's (x, y).
_POLYGONS = {
    "square": np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    "triangle": np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    "star": _fit_unit_box(_star()),
}
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel positions keep slow motion smooth
_ONE = 1 << _SHIFT


class _Renderer:
    """Draws frames with cv2 primitives onto a padded background (padding absorbs shake)."""

    def __init__(self, config: WorldConfig, rng: np.random.Generator) -> None:
        self.cfg = config
        self.rng = rng  # per-frame sensor noise only
        self.pad = config.shake_px
        self.canvas = np.empty(
            (config.height + 2 * self.pad, config.width + 2 * self.pad, 3), dtype=np.uint8
        )

    def background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        h, w = self.canvas.shape[:2]

        def tone() -> np.ndarray:
            grey = rng.uniform(25, 110)
            return np.clip(grey + rng.uniform(-18, 18, size=3), 0, _BG_MAX)

        base = tone()
        img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        if kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            t = xx * np.cos(angle) + yy * np.sin(angle)
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            img = img * (1 - t[..., None]) + tone().astype(np.float32) * t[..., None]
        elif kind == "textured":
            amp = rng.uniform(10, 22)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            pattern = int(rng.integers(3))
            if pattern == 0:  # stripes
                period, angle = rng.uniform(6, 14), rng.uniform(0, np.pi)
                wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
            elif pattern == 1:  # checkerboard
                cell = int(rng.integers(4, 10))
                wave = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
            else:  # soft blobs
                coarse = rng.uniform(-1, 1, size=(6, 6)).astype(np.float32)
                wave = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
            img = img + amp * wave[..., None]
        elif kind == "noisy":
            img = img + rng.normal(0, rng.uniform(6, 12), size=(h, w, 3))
        return np.clip(np.rint(img), 0, _BG_MAX).astype(np.uint8)

    def render(self, state: FrameState, background: np.ndarray, shaky: bool) -> np.ndarray:
        cfg, pad, canvas = self.cfg, self.pad, self.canvas
        np.copyto(canvas, background)
        for o in state.objects:
            self._draw(canvas, o, pad)
        dx, dy = state.shake
        # Shake moves the camera, so the picture moves the other way.
        view = canvas[pad - dy : pad - dy + cfg.height, pad - dx : pad - dx + cfg.width]
        if state.brightness != 1.0:
            image = cv2.convertScaleAbs(view, alpha=state.brightness)
        else:
            image = view.copy()
        if state.noise_sigma > 0:
            noise = self._noise(state.noise_sigma)
            image = np.clip(image + noise, 0, 255).astype(np.uint8)
        return image

    def _noise(self, sigma: float) -> np.ndarray:
        shape = (self.cfg.height, self.cfg.width, 3)
        return self.rng.standard_normal(shape, dtype=np.float32) * sigma

    def _draw(self, canvas: np.ndarray, o: ObjectState, pad: int) -> None:
        colour = PALETTE[o.colour]
        cx, cy = o.x + pad, o.y + pad
        span = o.size_px - 1  # pixel centres span size-1, so the drawn box is size_px wide
        if o.shape in ("circle", "ring"):
            centre = (round(cx * _ONE), round(cy * _ONE))
            radius = span / 2
            if o.shape == "circle":
                cv2.circle(canvas, centre, round(radius * _ONE), colour, -1, cv2.LINE_8, _SHIFT)
            else:
                thick = max(2, round(radius * 0.45))
                mid = radius - thick / 2
                cv2.circle(canvas, centre, round(mid * _ONE), colour, thick, cv2.LINE_8, _SHIFT)
            return
        pts = np.rint((_POLYGONS[o.shape] * span + (cx, cy)) * _ONE).astype(np.int32)
        cv2.fillPoly(canvas, [pts], colour, cv2.LINE_8, _SHIFT)


# --------------------------------------------------------------------------------------------
# Public entry points


def iter_stream(
    seed: int, config: WorldConfig = WorldConfig(), num_frames: int | None = None
) -> Iterator[StreamStep]:
    """Yield frames one by one (forever when `num_frames` is None) without holding them."""
    world = _World(seed, config)
    f = 0
    while num_frames is None or f < num_frames:
        yield world.step(f)
        f += 1


def generate_stream(seed: int, num_frames: int, config: WorldConfig = WorldConfig()) -> Stream:
    """The first `num_frames` frames of world `seed`, with all ground truth, in memory."""
    if num_frames < 0:
        raise ValueError("num_frames must be >= 0")
    frames = np.empty((num_frames, config.height, config.width, 3), dtype=np.uint8)
    states: list[FrameState] = []
    events: list[Event] = []
    questions: list[Question] = []
    for step in iter_stream(seed, config, num_frames):
        frames[step.state.index] = step.image
        states.append(step.state)
        events.extend(step.events)
        questions.extend(step.questions)
    log.debug("generated %d frames, %d events, seed %d", num_frames, len(events), seed)
    return Stream(
        seed=seed,
        config=config,
        fps=config.fps,
        frames=frames,
        states=tuple(states),
        events=tuple(events),
        questions=tuple(questions),
    )
