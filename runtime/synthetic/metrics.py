"""Score a narrator against the world's ground truth.

Predictions are (time_s, text) pairs: when the model spoke and what it said. A ground-truth
event is matched by at most one prediction spoken within [t_event - early_s, t_event + window_s];
events are taken in time order and each takes the earliest eligible unmatched prediction.
Three matching modes separate "said the right thing" from "noticed something happened":

- exact:  the normalised texts are equal;
- kind:   the prediction parses (grammar) to the same event kind, whatever colour/shape it named;
- timing: any speech at the right time counts.

TimeDiff (from VideoLLM-online) is the mean |t_pred - t_event| over matched pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .grammar import normalise, parse_narration
from .state import Event, FrameState, Question

MODES: tuple[str, ...] = ("exact", "kind", "timing")

Prediction = tuple[float, str]  # (time_s, text)


@dataclass(frozen=True)
class MatchScores:
    """Detection scores for one matching mode."""

    mode: str
    n_predictions: int
    n_events: int
    n_matched: int
    precision: float  # matched / predictions; 1.0 when nothing was said and nothing happened
    recall: float  # matched / events; 1.0 when nothing happened
    f1: float
    recall_by_kind: Mapping[str, float]  # event kind value -> recall, for kinds present
    time_diff_s: float | None  # mean |t_pred - t_event| over matches; None without matches
    matches: tuple[tuple[int, int], ...]  # (event index, prediction index) pairs


@dataclass(frozen=True)
class NarrationReport:
    """All three matching modes for the same predictions."""

    exact: MatchScores
    kind: MatchScores
    timing: MatchScores

    def as_dict(self) -> dict[str, dict[str, object]]:
        return {
            s.mode: {
                "precision": s.precision,
                "recall": s.recall,
                "f1": s.f1,
                "time_diff_s": s.time_diff_s,
                "recall_by_kind": dict(s.recall_by_kind),
                "n_predictions": s.n_predictions,
                "n_events": s.n_events,
                "n_matched": s.n_matched,
            }
            for s in (self.exact, self.kind, self.timing)
        }


def _event_kind(event: Event | Prediction) -> str:
    if isinstance(event, Event):
        return event.kind.value
    parsed = parse_narration(event[1])
    return parsed.kind.value if parsed is not None else "unknown"


def _as_pair(event: Event | Prediction) -> Prediction:
    return (event.time_s, event.text) if isinstance(event, Event) else (float(event[0]), event[1])


def match_narrations(
    predictions: Sequence[Prediction],
    events: Sequence[Event | Prediction],
    window_s: float = 2.0,
    mode: str = "exact",
    early_s: float = 0.0,
) -> MatchScores:
    """Match predictions to ground-truth events (Event objects or (time_s, text) pairs)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gt = sorted(range(len(events)), key=lambda i: _as_pair(events[i])[0])
    preds = sorted(range(len(predictions)), key=lambda j: float(predictions[j][0]))
    pred_norm = [normalise(text) for _, text in predictions]
    pred_kind = [_kind_of(text) for _, text in predictions]
    used: set[int] = set()
    matches: list[tuple[int, int]] = []
    errors: list[float] = []
    for i in gt:
        t_gt, text = _as_pair(events[i])
        kind, norm = _event_kind(events[i]), normalise(text)
        for j in preds:
            t_pred = float(predictions[j][0])
            if j in used or t_pred < t_gt - early_s:
                continue
            if t_pred > t_gt + window_s:
                break
            if mode == "exact" and pred_norm[j] != norm:
                continue
            if mode == "kind" and pred_kind[j] != kind:
                continue
            used.add(j)
            matches.append((i, j))
            errors.append(abs(t_pred - t_gt))
            break

    n_pred, n_gt, n_match = len(predictions), len(events), len(matches)
    precision = n_match / n_pred if n_pred else (1.0 if n_gt == 0 else 0.0)
    recall = n_match / n_gt if n_gt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    totals: dict[str, int] = {}
    hits: dict[str, int] = {}
    matched_events = {i for i, _ in matches}
    for i, event in enumerate(events):
        k = _event_kind(event)
        totals[k] = totals.get(k, 0) + 1
        hits[k] = hits.get(k, 0) + (i in matched_events)
    return MatchScores(
        mode=mode,
        n_predictions=n_pred,
        n_events=n_gt,
        n_matched=n_match,
        precision=precision,
        recall=recall,
        f1=f1,
        recall_by_kind={k: hits[k] / totals[k] for k in sorted(totals)},
        time_diff_s=sum(errors) / len(errors) if errors else None,
        matches=tuple(sorted(matches)),
    )


def _kind_of(text: str) -> str | None:
    parsed = parse_narration(text)
    return parsed.kind.value if parsed is not None else None


def score_narrations(
    predictions: Sequence[Prediction],
    events: Sequence[Event | Prediction],
    window_s: float = 2.0,
    early_s: float = 0.0,
) -> NarrationReport:
    """`match_narrations` in every mode."""
    exact, kind, timing = (
        match_narrations(predictions, events, window_s, mode, early_s) for mode in MODES
    )
    return NarrationReport(exact=exact, kind=kind, timing=timing)


def wrong_details(
    predictions: Sequence[Prediction],
    events: Sequence[Event],
    states: Sequence[FrameState],
    report: NarrationReport,
) -> dict[str, dict[str, int]]:
    """What was wrong in the narrations that named the right kind of event but not the exact
    text, per event kind: {kind: {reason: count}}.

    Reasons, joined with "+" when several apply: "object in view" (named another object that
    was in the frame), "object not in view" (an object the frame did not show), "direction",
    "new colour". Read against the kind-mode matches, so each counts once per event.
    """
    exact = {i for i, _ in report.exact.matches}
    out: dict[str, dict[str, int]] = {}
    for i, j in report.kind.matches:
        if i in exact:
            continue
        e, said = events[i], parse_narration(predictions[j][1])
        if said is None:
            continue
        reasons = []
        if (said.colour, said.shape) != (e.colour, e.shape):
            # a leaving object may be gone from its event frame: look one frame back too
            shown = {
                (o.colour, o.shape)
                for f in (e.frame_index, max(0, e.frame_index - 1))
                for o in states[f].objects
                if o.object_id != e.object_id
            }
            seen = (said.colour, said.shape) in shown
            reasons.append("object in view" if seen else "object not in view")
        if said.direction != e.direction:
            reasons.append("direction")
        if said.new_colour != e.new_colour:
            reasons.append("new colour")
        why = "+".join(reasons) or "wording"
        by_kind = out.setdefault(e.kind.value, {})
        by_kind[why] = by_kind.get(why, 0) + 1
    return out


def recall_by_objects_in_view(
    events: Sequence[Event], states: Sequence[FrameState], report: NarrationReport
) -> dict[str, dict[str, tuple[int, int]]]:
    """Exact-text recall of object events by how many objects were in view, per event kind:
    {kind: {"1" | "2" | "3+": (matched, events)}}.

    Naming the object that moved is easy alone and a binding problem among others; this
    separates the two. In view: the objects of the event frame and the one before it (a
    leaving object may be gone from its event frame).
    """
    exact = {i for i, _ in report.exact.matches}
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for i, e in enumerate(events):
        if e.object_id is None:
            continue
        frames = (e.frame_index, max(0, e.frame_index - 1))
        n = len({o.object_id for f in frames for o in states[f].objects})
        bucket = str(n) if n < 3 else "3+"
        by_kind = out.setdefault(e.kind.value, {})
        hit, total = by_kind.get(bucket, (0, 0))
        by_kind[bucket] = (hit + (i in exact), total + 1)
    return out


def question_accuracy(predicted: Sequence[str], expected: Sequence[str | Question]) -> float:
    """Fraction of answers equal to the expected ones after normalisation."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} answers for {len(expected)} questions")
    if not expected:
        return 1.0
    truth = [q.answer if isinstance(q, Question) else q for q in expected]
    right = sum(normalise(p) == normalise(t) for p, t in zip(predicted, truth))
    return right / len(expected)


__all__ = [
    "MODES",
    "MatchScores",
    "NarrationReport",
    "match_narrations",
    "question_accuracy",
    "score_narrations",
    "wrong_details",
]
