"""The closed grammar of the synthetic world: every narration, question and answer it can say.

The demo model's tokenizer is trained on `all_sentences()`, so everything the world emits must
come from the templates here, and `parse_narration` must invert `narrate` exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
SIZES: tuple[str, ...] = ("small", "large")
SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")  # where an object enters from
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")  # where an object moves to
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
# Cells of a 3x3 grid, row-major, matching the vision encoder's 3x3 pooled tokens.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
YES_NO: tuple[str, ...] = ("yes", "no")


class EventKind(str, Enum):
    """What happened; the value is the stable name used in JSON and per-kind metrics."""

    ENTER = "enter"
    LEAVE = "leave"
    MOVE = "move"
    STOP = "stop"
    RECOLOUR = "recolour"
    DIM = "dim"
    BRIGHTEN = "brighten"
    CUT = "cut"


EVENT_KINDS: tuple[EventKind, ...] = tuple(EventKind)
OBJECT_EVENT_KINDS: frozenset[EventKind] = frozenset(
    {EventKind.ENTER, EventKind.LEAVE, EventKind.MOVE, EventKind.STOP, EventKind.RECOLOUR}
)

_FIXED_NARRATIONS: dict[EventKind, str] = {
    EventKind.DIM: "the scene goes dark",
    EventKind.BRIGHTEN: "the lights come back on",
    EventKind.CUT: "the scene changes",
}


class QuestionKind(str, Enum):
    """Question templates; each has a closed answer set (see `answers_for`)."""

    COUNT = "count"
    COLOUR = "colour"
    SHAPE = "shape"
    DARK = "dark"
    EXISTS = "exists"
    MOVING = "moving"
    DIRECTION = "direction"
    WHERE = "where"
    SIZE = "size"
    # "what colour/shape is the moving object?": asked only by worlds with mover_questions
    # (train-demo --mover-questions); outside all_questions(), the shipped tokenizer's corpus
    MOVER_COLOUR = "mover_colour"
    MOVER_SHAPE = "mover_shape"


MOVER_KINDS = (QuestionKind.MOVER_COLOUR, QuestionKind.MOVER_SHAPE)


@dataclass(frozen=True)
class Narration:
    """A narration taken apart; fields a kind does not use are None."""

    kind: EventKind
    colour: str | None = None  # the object's colour before the event
    shape: str | None = None
    direction: str | None = None  # enter: the side it came from; move: where it is going
    new_colour: str | None = None  # recolour only


def narrate(
    kind: EventKind | str,
    colour: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
    new_colour: str | None = None,
) -> str:
    """The one sentence for an event; raises ValueError when a needed field is missing."""
    kind = EventKind(kind)
    if kind in _FIXED_NARRATIONS:
        return _FIXED_NARRATIONS[kind]
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"{kind.value} needs a colour and a shape, got {colour!r} {shape!r}")
    if kind is EventKind.ENTER:
        if direction not in SIDES:
            raise ValueError(f"enter needs a side in {SIDES}, got {direction!r}")
        return f"a {colour} {shape} enters from the {direction}"
    if kind is EventKind.LEAVE:
        return f"the {colour} {shape} leaves"
    if kind is EventKind.MOVE:
        if direction not in DIRECTIONS:
            raise ValueError(f"move needs a direction in {DIRECTIONS}, got {direction!r}")
        return f"the {colour} {shape} moves {direction}"
    if kind is EventKind.STOP:
        return f"the {colour} {shape} stops"
    if new_colour not in COLOURS or new_colour == colour:
        raise ValueError(f"recolour needs a different new colour, got {new_colour!r}")
    return f"the {colour} {shape} turns {new_colour}"


# Spelling variants a model (or a person typing an answer) may use; the grammar itself is British.
_ALIASES = {"color": "colour", "center": "centre", "middle": "centre", "gray": "grey"}
_NON_WORD = re.compile(r"[^a-z0-9 ]+")


def normalise(text: str) -> str:
    """Lower-case, drop punctuation, collapse spaces and map spelling variants."""
    words = _NON_WORD.sub(" ", text.lower()).split()
    return " ".join(_ALIASES.get(w, w) for w in words)


def _alt(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_C, _S = f"(?P<colour>{_alt(COLOURS)})", f"(?P<shape>{_alt(SHAPES)})"
_PATTERNS: tuple[tuple[EventKind, re.Pattern[str]], ...] = (
    (EventKind.ENTER, re.compile(rf"a {_C} {_S} enters from the (?P<direction>{_alt(SIDES)})")),
    (EventKind.LEAVE, re.compile(rf"the {_C} {_S} leaves")),
    (EventKind.MOVE, re.compile(rf"the {_C} {_S} moves (?P<direction>{_alt(DIRECTIONS)})")),
    (EventKind.STOP, re.compile(rf"the {_C} {_S} stops")),
    (EventKind.RECOLOUR, re.compile(rf"the {_C} {_S} turns (?P<new_colour>{_alt(COLOURS)})")),
)


def parse_narration(text: str) -> Narration | None:
    """Invert `narrate`; None when the text is not a sentence of the grammar."""
    text = normalise(text)
    for kind, sentence in _FIXED_NARRATIONS.items():
        if text == sentence:
            return Narration(kind)
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is not None:
            parsed = Narration(kind, **m.groupdict())
            # "the red circle turns red" is not a sentence the world says.
            return (
                None
                if parsed.new_colour is not None and parsed.new_colour == parsed.colour
                else parsed
            )
    return None


def question_text(
    kind: QuestionKind | str, colour: str | None = None, shape: str | None = None
) -> str:
    """The question sentence; object questions name the object by colour and shape."""
    kind = QuestionKind(kind)
    if kind is QuestionKind.COUNT:
        return "how many objects are there?"
    if kind is QuestionKind.DARK:
        return "is the scene dark?"
    if kind is QuestionKind.COLOUR:
        return f"what colour is the {shape}?"
    if kind is QuestionKind.SHAPE:
        return f"what shape is the {colour} object?"
    if kind is QuestionKind.MOVER_COLOUR:
        return "what colour is the moving object?"
    if kind is QuestionKind.MOVER_SHAPE:
        return "what shape is the moving object?"
    templates = {
        QuestionKind.EXISTS: "is there a {c} {s}?",
        QuestionKind.MOVING: "is the {c} {s} moving?",
        QuestionKind.DIRECTION: "which way is the {c} {s} moving?",
        QuestionKind.WHERE: "where is the {c} {s}?",
        QuestionKind.SIZE: "what size is the {c} {s}?",
    }
    return templates[kind].format(c=colour, s=shape)


def answers_for(kind: QuestionKind | str) -> tuple[str, ...]:
    """The closed set of answers a question kind can have."""
    return {
        QuestionKind.COUNT: NUMBERS,
        QuestionKind.DARK: YES_NO,
        QuestionKind.COLOUR: COLOURS,
        QuestionKind.SHAPE: SHAPES,
        QuestionKind.EXISTS: YES_NO,
        QuestionKind.MOVING: YES_NO,
        QuestionKind.DIRECTION: DIRECTIONS,
        QuestionKind.WHERE: POSITIONS,
        QuestionKind.SIZE: SIZES,
        QuestionKind.MOVER_COLOUR: COLOURS,
        QuestionKind.MOVER_SHAPE: SHAPES,
    }[QuestionKind(kind)]


def all_narrations() -> list[str]:
    """Every narration the world can produce, in a stable order."""
    out = [_FIXED_NARRATIONS[k] for k in (EventKind.DIM, EventKind.BRIGHTEN, EventKind.CUT)]
    for c in COLOURS:
        for s in SHAPES:
            out += [narrate(EventKind.ENTER, c, s, side) for side in SIDES]
            out.append(narrate(EventKind.LEAVE, c, s))
            out += [narrate(EventKind.MOVE, c, s, d) for d in DIRECTIONS]
            out.append(narrate(EventKind.STOP, c, s))
            out += [narrate(EventKind.RECOLOUR, c, s, new_colour=n) for n in COLOURS if n != c]
    return out


def all_questions() -> list[str]:
    """Every question the default world asks, in a stable order (the tokenizer's corpus;
    the MOVER_KINDS questions are left out so the corpus stays what the shipped tokenizer
    was trained on: their words are all in it)."""
    out = [question_text(QuestionKind.COUNT), question_text(QuestionKind.DARK)]
    out += [question_text(QuestionKind.COLOUR, shape=s) for s in SHAPES]
    out += [question_text(QuestionKind.SHAPE, colour=c) for c in COLOURS]
    per_object = (
        QuestionKind.EXISTS,
        QuestionKind.MOVING,
        QuestionKind.DIRECTION,
        QuestionKind.WHERE,
        QuestionKind.SIZE,
    )
    for kind in per_object:
        out += [question_text(kind, c, s) for c in COLOURS for s in SHAPES]
    return out


def all_answers() -> list[str]:
    """Every answer, deduplicated, in a stable order."""
    seen: dict[str, None] = {}
    for kind in QuestionKind:
        seen.update(dict.fromkeys(answers_for(kind)))
    return list(seen)


def all_sentences() -> list[str]:
    """Every narration, question and answer string: the tokenizer's training corpus."""
    return all_narrations() + all_questions() + all_answers()


def vocabulary() -> list[str]:
    """The sorted set of words (punctuation split off) in `all_sentences()`."""
    words: set[str] = set()
    for sentence in all_sentences():
        words.update(sentence.replace("?", " ?").split())
    return sorted(words)
