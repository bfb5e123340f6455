"""Questions about a frame that have exactly one correct answer (the world's "ask" ground
truth, and what `ask()` is trained and scored on)."""

from __future__ import annotations

from .grammar import NUMBERS, POSITIONS, QuestionKind, question_text
from .state import FrameState, ObjectState, Question, WorldConfig

_CELL_MARGIN = 3.0  # px an object's centre must keep from a 3x3 cell border to be "where"-asked


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


def mover_questions(state: FrameState) -> list[Question]:
    """ "What colour / shape is the moving object?" when exactly one object in view moves
    (an object partly off screen still has both); none otherwise."""
    movers = [o for o in state.objects if o.moving]
    if len(movers) != 1:
        return []
    o = movers[0]
    return [
        Question(state.index, state.time_s, kind, question_text(kind), answer, o.object_id)
        for kind, answer in (
            (QuestionKind.MOVER_COLOUR, o.colour),
            (QuestionKind.MOVER_SHAPE, o.shape),
        )
    ]
