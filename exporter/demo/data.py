"""Synthetic streams -> training sequences in VideoLLM-online's streaming template.

A sequence is laid out token for token as `StreamLoop` feeds the model at inference (the same
template pieces, tokenised piece by piece), so training sees exactly the inference context:

    sink "\\n[" <v>*N "," <v>*N "]\\nAssistant:" " narration" eos "\\n[" <v>*N ...

Losses: the LM loss on narration and answer tokens and their EOS; the stream loss at the last
`<v>` of every frame, towards "," on silent frames and towards "]" (the first token of
"]\\nAssistant:") on frames whose event the model should narrate. The narration fires on the
event frame itself, the first frame where the change is visible, or `delay` frames after it
for the kinds a run delays (`narration_frames`): a narrator that says "the red circle moves
left" one frame into the motion has seen the object move twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onsight.runtime.stream_loop import TemplateIds
from onsight.runtime.synthetic import Stream, WorldConfig, curriculum, generate_stream
from onsight.runtime.synthetic.grammar import COLOURS, EVENT_KINDS, SHAPES, EventKind
from onsight.runtime.synthetic.state import FrameState

IGNORE = -100  # label of positions without an LM loss (torch's cross-entropy default)


@dataclass(frozen=True)
class Example:
    """One stream as a training sequence."""

    ids: np.ndarray  # (L,) int64 token ids; vision slots hold the <v> id
    labels: np.ndarray  # (L,) int64 next-token targets of the LM loss, IGNORE elsewhere
    frame_pos: np.ndarray  # (F, N) int64 sequence positions of each frame's vision tokens
    stream_label: np.ndarray  # (F,) int64 "," (stay silent) or "]" (speak) after each frame
    frames: np.ndarray  # (F, S, S, 3) uint8 RGB
    aux: np.ndarray  # (F, 10, AUX_DIM) float32 per-token scene targets (see frame_targets)
    change: np.ndarray  # (F, 10, CHANGE_DIM) float32 per-token change targets (change_targets)
    actor: np.ndarray  # (F, 10) float32 where the acting object is (actor_targets)
    onset: np.ndarray  # (F, 10) float32 where a move has just begun (onset_targets)


@dataclass(frozen=True)
class Batch:
    """Examples right-padded to a common length (padding is causal-harmless: it comes last)."""

    ids: np.ndarray  # (B, L)
    labels: np.ndarray  # (B, L)
    frame_pos: np.ndarray  # (B, F, N)
    stream_label: np.ndarray  # (B, F)
    frames: np.ndarray  # (B, F, S, S, 3)
    aux: np.ndarray  # (B, F, 10, AUX_DIM)
    change: np.ndarray  # (B, F, 10, CHANGE_DIM)
    actor: np.ndarray  # (B, F, 10)
    onset: np.ndarray  # (B, F, 10)


# Auxiliary targets per frame token: colours and shapes present (multi-hot), plus "dark".
# Grid token c covers 3x3 cell c (by object centre); the pooled token covers the whole frame.
# They teach the tower what is where within a few hundred steps, which the sparse narration
# loss alone does slowly; the auxiliary head is dropped after training.
AUX_DIM = len(COLOURS) + len(SHAPES) + 1


def _cell(o, width: int, height: int) -> int:
    """The grid token (1 + row * 3 + col) of the cell holding an object's centre."""
    col = min(2, max(0, int(o.x * 3 // width)))
    row = min(2, max(0, int(o.y * 3 // height)))
    return 1 + row * 3 + col


def frame_targets(state: FrameState, width: int, height: int) -> np.ndarray:
    """(10, AUX_DIM) targets for the 1 + 3x3 tokens of one frame."""
    out = np.zeros((10, AUX_DIM), np.float32)
    for o in state.objects:
        for token in (0, _cell(o, width, height)):
            out[token, COLOURS.index(o.colour)] = 1.0
            out[token, len(COLOURS) + SHAPES.index(o.shape)] = 1.0
    out[:, -1] = float(state.dark)
    return out


# Change targets, read from the decoder's output at every vision token: the kinds of event at
# this frame (shared by its tokens) and, per grid cell, whether an object there is moving.
# Both need the frame compared with the ones before it: dense supervision for exactly the
# cross-frame attention that the one speak decision per frame teaches only slowly.
CHANGE_DIM = len(EVENT_KINDS) + 1


def change_targets(stream: Stream) -> np.ndarray:
    """(F, 10, CHANGE_DIM) change targets of a stream."""
    w, h = stream.config.width, stream.config.height
    out = np.zeros((stream.num_frames, 10, CHANGE_DIM), np.float32)
    for e in stream.events:
        out[e.frame_index, :, EVENT_KINDS.index(e.kind)] = 1.0
    for f, state in enumerate(stream.states):
        for o in state.objects:
            if o.moving:
                out[f, 0, -1] = out[f, _cell(o, w, h), -1] = 1.0
    return out


def actor_targets(stream: Stream) -> np.ndarray:
    """(F, 10) the tokens showing what a narration would be about, per frame.

    The cells of moving objects; at an object event, the cell of *that* object (where it is,
    or where it was last seen when it left), not of the others in the scene; at a global
    event (dim, brighten, cut), the pooled whole-frame token. A router target that names the
    actor, so that the kept tokens are the ones a narration needs (`router_loss`).
    """
    w, h = stream.config.width, stream.config.height
    out = np.zeros((stream.num_frames, 10), np.float32)
    for f, state in enumerate(stream.states):
        for o in state.objects:
            if o.moving:
                out[f, _cell(o, w, h)] = 1.0
    for e in stream.events:
        f = e.frame_index
        if e.object_id is None:
            out[f, 0] = 1.0
            continue
        for state in (stream.states[f], stream.states[max(0, f - 1)]):
            seen = [o for o in state.objects if o.object_id == e.object_id]
            if seen:
                out[f, _cell(seen[0], w, h)] = 1.0
                break
    return out


def onset_targets(stream: Stream, window: int = 2) -> np.ndarray:
    """(F, 10) the tokens showing an object whose move began in the last `window` frames.

    The mover's cell (and the pooled token) on its move's event frame and the `window` - 1
    frames after it, while it is still moving: the frames a move is narrated on (on the event
    frame, or one frame late with stage 4's NarrationDelay). Telling a just-started motion
    from a sustained one or from a still object is the binding MoD's routed layers cost
    (TRAINING.md, sessions 7-11); a head on these targets asks for it where text reads it.
    """
    w, h = stream.config.width, stream.config.height
    out = np.zeros((stream.num_frames, 10), np.float32)
    for e in stream.events:
        if e.kind is not EventKind.MOVE:
            continue
        for f in range(e.frame_index, min(e.frame_index + window, stream.num_frames)):
            for o in stream.states[f].objects:
                if o.object_id == e.object_id and o.moving:
                    out[f, 0] = out[f, _cell(o, w, h)] = 1.0
    return out


@dataclass(frozen=True)
class NarrationDelay:
    """Narrate events of `kinds` `frames` frames after they happen (0: on the event frame).

    The world spaces events `min_event_gap` frames apart, so a delay below that gap never puts
    two narrations on one frame; an event delayed past the stream's end goes unnarrated.
    """

    frames: int = 0
    kinds: tuple[str, ...] = ()  # EventKind values

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - {k.value for k in EVENT_KINDS})
        if unknown:
            raise ValueError(
                f"narration delay: unknown event kind(s) {unknown}; "
                f"choose from {[k.value for k in EVENT_KINDS]}"
            )
        if self.frames < 0:
            raise ValueError(f"narration delay: {self.frames} frames; give 0 or more")

    @classmethod
    def parse(cls, frames: int, kinds: str) -> NarrationDelay:
        """From the CLI's --narration-delay N and --delay-kinds "move,leave" (or "all")."""
        names = [k.value for k in EVENT_KINDS] if kinds == "all" else kinds.split(",")
        return cls(frames, tuple(k.strip() for k in names if k.strip()) if frames else ())


def narration_frames(stream: Stream, delay: NarrationDelay = NarrationDelay()) -> dict:
    """{frame index: event} of the frames whose event the model narrates there."""
    if delay.frames >= stream.config.min_event_gap:
        raise ValueError(
            f"narration delay of {delay.frames} frames reaches the next event (events are "
            f"{stream.config.min_event_gap} frames apart): give fewer frames"
        )
    out = {}
    for e in stream.events:
        f = e.frame_index + (delay.frames if e.kind.value in delay.kinds else 0)
        if f < stream.num_frames:
            out[f] = e
    return out


def build_example(
    stream: Stream,
    t: TemplateIds,
    encode: Callable[[str], list[int]],
    v_id: int,
    tokens_per_frame: int,
    delay: NarrationDelay = NarrationDelay(),
) -> Example:
    """Lay out `stream` as StreamLoop would feed it, with loss targets."""
    ids: list[int] = list(t.sink)
    labels: list[int] = [IGNORE] * len(ids)
    frame_pos, stream_label = [], []
    events = narration_frames(stream, delay)
    questions: dict[int, list] = {}
    for q in stream.questions:
        questions.setdefault(q.frame_index, []).append(q)
    close = t.stream_close[0]

    def feed(tokens: list[int] | tuple[int, ...]) -> None:
        ids.extend(tokens)
        labels.extend([IGNORE] * len(tokens))

    def turn(prefix: list[int], reply: list[int]) -> None:
        # The prefix's last token predicts the reply's first; the reply's last predicts EOS.
        feed(prefix)
        labels[-1] = reply[0]
        ids.extend(reply)
        labels.extend(reply[1:] + [t.eos_id])

    pending: list[int] = list(t.stream_open)
    for f in range(stream.num_frames):
        feed(pending)
        start = len(ids)
        feed([v_id] * tokens_per_frame)
        frame_pos.append(np.arange(start, start + tokens_per_frame))
        event = events.get(f)
        stream_label.append(close if event is not None else t.interval_id)
        tail: list[int] = []
        closed = False
        if event is not None:
            turn(list(t.stream_close + t.assistant_prefix), encode(" " + event.text))
            tail, closed = [t.eos_id], True
        for q in questions.get(f, []):
            prefix = tail + ([] if closed else list(t.stream_close))
            prefix += list(t.user_prefix) + encode(q.text) + list(t.assistant_prefix)
            turn(prefix, encode(" " + q.answer))
            tail, closed = [t.eos_id], True
        pending = tail + list(t.stream_open) if closed else [t.interval_id]
    return Example(
        ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        frame_pos=np.stack(frame_pos).astype(np.int64),
        stream_label=np.asarray(stream_label, dtype=np.int64),
        frames=stream.frames,
        aux=np.stack(
            [frame_targets(st, stream.config.width, stream.config.height) for st in stream.states]
        ),
        change=change_targets(stream),
        actor=actor_targets(stream),
        onset=onset_targets(stream),
    )


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest; every example must have the same number of frames."""
    length = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    labels = np.full((len(examples), length), IGNORE, dtype=np.int64)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = e.ids
        labels[b, : len(e.labels)] = e.labels
    return Batch(
        ids=ids,
        labels=labels,
        frame_pos=np.stack([e.frame_pos for e in examples]),
        stream_label=np.stack([e.stream_label for e in examples]),
        frames=np.stack([e.frames for e in examples]),
        aux=np.stack([e.aux for e in examples]),
        change=np.stack([e.change for e in examples]),
        actor=np.stack([e.actor for e in examples]),
        onset=np.stack([e.onset for e in examples]),
    )


def stage_config(
    stage: int, question_prob: float, mover_questions: float = 0.0, onset_questions: float = 0.0
) -> WorldConfig:
    """The curriculum stage's world, with questions as often as training wants them."""
    return dataclasses.replace(
        curriculum(stage),
        question_prob=question_prob,
        mover_questions=mover_questions,
        onset_questions=onset_questions,
    )


@dataclass(frozen=True)
class BatchSource:
    """Deterministic batches: batch `step` depends only on (seed, step, stage)."""

    template: TemplateIds
    encode: Callable[[str], list[int]]
    v_id: int
    tokens_per_frame: int
    batch_size: int = 16  # streams per step
    num_frames: int = 32  # frames per stream
    question_prob: float = 0.15  # chance a frame carries a question
    mover_questions: float = 0.0  # chance of "the moving object?" questions (WorldConfig)
    onset_questions: float = 0.0  # the same on the frame a move starts (WorldConfig)
    seed: int = 0  # base seed of the training streams
    seed_range: int = 100_000  # training world seeds lie in [0, seed_range); eval uses above
    delay: NarrationDelay = NarrationDelay()  # which narrations come frames after their event

    def batch(self, step: int, stage: int) -> Batch:
        cfg = stage_config(stage, self.question_prob, self.mover_questions, self.onset_questions)
        rng = np.random.default_rng([self.seed, step])
        seeds = rng.integers(0, self.seed_range, self.batch_size)
        examples = [
            build_example(
                generate_stream(int(s), self.num_frames, cfg),
                self.template,
                self.encode,
                self.v_id,
                self.tokens_per_frame,
                self.delay,
            )
            for s in seeds
        ]
        return collate(examples, pad_id=self.template.eos_id)
