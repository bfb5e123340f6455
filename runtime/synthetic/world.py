"""A seeded procedural video world with exact per-frame ground truth.

Design constraints come from the narrator downstream: its vision encoder sees one frame at a
time as 1 + 3x3 pooled tokens, so objects are large, move at least a third of a grid cell per
frame, at most a few are on screen, and events are spaced `min_event_gap` frames apart so each
narration belongs to exactly one frame. Motion is planned when it starts (where it stops or
when it leaves), which is what lets the planner keep every event - planned or spontaneous -
spaced out and every trajectory collision-free.

This module is the generator (planning, events, the public `iter_stream` / `generate_stream`);
the types it fills in are in `state`, the questions in `questions`, the pixels in `render`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .grammar import (
    DIRECTIONS,
    SIZES,
    EventKind,
    QuestionKind,
    narrate,
)
from .questions import mover_questions, questions_for_state
from .render import PALETTE, Renderer
from .state import (
    BACKGROUNDS,
    EDGE_MARGIN,
    Event,
    FrameState,
    ObjectState,
    Question,
    Stream,
    StreamStep,
    WorldConfig,
    curriculum,
)

# The world's types (state), its questions and its palette (render) live in their own
# modules; importing them from here keeps working.
__all__ = [
    "BACKGROUNDS",
    "PALETTE",
    "Event",
    "FrameState",
    "ObjectState",
    "Question",
    "Stream",
    "StreamStep",
    "WorldConfig",
    "curriculum",
    "generate_stream",
    "iter_stream",
    "questions_for_state",
]

log = logging.getLogger(__name__)


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
_SEPARATION = 3.0  # px kept between any two objects' boxes so they never touch or occlude


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
        self.renderer = Renderer(config, self.pixel_rng)
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
        lo = px / 2 + EDGE_MARGIN
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
        h = px / 2 + EDGE_MARGIN
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
            lo = px / 2 + EDGE_MARGIN
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
        questions = self._ask(state, events)
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

    def _ask(self, state: FrameState, events: list[Event]) -> tuple[Question, ...]:
        rng = self.question_rng
        # Mover questions are off in the default world, whose draws stay as they were.
        onset = any(e.kind is EventKind.MOVE for e in events)
        for p in (self.cfg.onset_questions if onset else 0.0, self.cfg.mover_questions):
            movers = mover_questions(state) if p > 0 else []
            if movers and rng.random() < p:
                return (movers[int(rng.integers(len(movers)))],)
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
