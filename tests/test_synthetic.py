"""The synthetic world: determinism, pixel-exact ground truth, grammar, metrics, demo video."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest

from onsight.runtime.synthetic import (
    EVENT_KINDS,
    EventKind,
    QuestionKind,
    Stream,
    WorldConfig,
    all_sentences,
    curriculum,
    generate_stream,
    iter_stream,
    match_narrations,
    narrate,
    parse_narration,
    question_accuracy,
    render_demo_video,
    score_narrations,
    vocabulary,
    wrong_details,
)
from onsight.runtime.synthetic.grammar import (
    MOVER_KINDS,
    all_narrations,
    all_questions,
    answers_for,
)
from onsight.runtime.synthetic.world import PALETTE

SEEDS = (0, 1, 2, 3)
N = 600


@pytest.fixture(scope="module")
def streams() -> list[Stream]:
    return [generate_stream(seed, N) for seed in SEEDS]


# ---- determinism ----


def test_same_seed_same_stream() -> None:
    a, b = generate_stream(7, 150), generate_stream(7, 150)
    assert np.array_equal(a.frames, b.frames)
    assert a.events == b.events and a.states == b.states and a.questions == b.questions


def test_different_seed_different_stream() -> None:
    a, b = generate_stream(7, 150), generate_stream(8, 150)
    assert not np.array_equal(a.frames, b.frames)
    assert [e.text for e in a.events] != [e.text for e in b.events]


def test_iterator_matches_batch() -> None:
    stream = generate_stream(11, 120)
    steps = list(iter_stream(11, num_frames=120))
    assert np.array_equal(np.stack([s.image for s in steps]), stream.frames)
    assert tuple(e for s in steps for e in s.events) == stream.events
    assert all(e.frame_index == s.state.index for s in steps for e in s.events)


def test_frame_format(streams: list[Stream]) -> None:
    s = streams[0]
    assert s.frames.shape == (N, 64, 64, 3) and s.frames.dtype == np.uint8
    assert s.fps == 2.0
    assert [st.time_s for st in s.states[:3]] == [0.0, 0.5, 1.0]


# ---- ground truth agrees with the pixels ----


def test_pixels_match_object_states(streams: list[Stream]) -> None:
    checked = 0
    for s in streams:
        for frame, state in zip(s.frames, s.states):
            if not state.clean:
                continue
            for o in state.objects:
                if not o.fully_visible:
                    continue
                # Objects are kept >= 3 px apart, so a window around the box is this object alone.
                h = o.size_px // 2 + 2
                x0, y0 = max(0, round(o.x) - h), max(0, round(o.y) - h)
                window = frame[y0 : round(o.y) + h + 1, x0 : round(o.x) + h + 1]
                ys, xs = np.nonzero(np.all(window == PALETTE[o.colour], axis=-1))
                assert len(xs) > o.size_px, (state.index, o)
                cx, cy = x0 + (xs.min() + xs.max()) / 2, y0 + (ys.min() + ys.max()) / 2
                assert abs(cx - o.x) <= 1.5 and abs(cy - o.y) <= 1.5, (state.index, o, cx, cy)
                assert xs.max() - xs.min() + 1 <= o.size_px + 1
                checked += 1
    assert checked > 500


def test_dark_frames_are_darker(streams: list[Stream]) -> None:
    for s in streams:
        for frame, state in zip(s.frames, s.states):
            if state.dark and state.noise_sigma == 0:
                assert frame.max() <= round(255 * state.brightness) + 1


# ---- the world obeys its own rules ----


def test_every_change_has_exactly_one_event(streams: list[Stream]) -> None:
    """State diffs between consecutive frames are exactly what the events say."""
    for s in streams:
        by_frame = {e.frame_index: e for e in s.events}
        assert len(by_frame) == len(s.events), "at most one event per frame"
        for prev, cur in zip(s.states, s.states[1:]):
            e = by_frame.get(cur.index)
            if cur.scene_id != prev.scene_id:
                assert e is not None and e.kind is EventKind.CUT
                continue
            before = {o.object_id: o for o in prev.objects}
            after = {o.object_id: o for o in cur.objects}
            changes = []
            changes += [(EventKind.ENTER, i) for i in after.keys() - before.keys()]
            changes += [(EventKind.LEAVE, i) for i in before.keys() - after.keys()]
            for i in after.keys() & before.keys():
                a, b = before[i], after[i]
                if a.moving and not b.moving:
                    changes.append((EventKind.STOP, i))
                if b.moving and not a.moving:
                    changes.append((EventKind.MOVE, i))
                if a.colour != b.colour:
                    changes.append((EventKind.RECOLOUR, i))
                if not b.moving:
                    assert (a.x, a.y) == (b.x, b.y)
            if cur.brightness < prev.brightness:
                changes.append((EventKind.DIM, None))
            if cur.brightness > prev.brightness:
                changes.append((EventKind.BRIGHTEN, None))
            if e is None:
                assert changes == [], (cur.index, changes)
            else:
                assert changes == [(e.kind, e.object_id)], (cur.index, changes, e)


def test_events_are_spaced_and_objects_unique(streams: list[Stream]) -> None:
    gap = WorldConfig().min_event_gap
    for s in streams:
        frames = [e.frame_index for e in s.events]
        assert all(b - a >= gap for a, b in zip(frames, frames[1:]))
        for state in s.states:
            names = [(o.colour, o.shape) for o in state.objects]
            assert len(names) == len(set(names)) and len(names) <= 3
            for i, a in enumerate(state.objects):
                for b in state.objects[i + 1 :]:
                    reach = (a.size_px + b.size_px) / 2
                    assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def test_moving_objects_are_fast_enough(streams: list[Stream]) -> None:
    speeds = [
        np.hypot(o.vx, o.vy) for s in streams for st in s.states for o in st.objects if o.moving
    ]
    assert speeds and min(speeds) >= 7.0  # crosses a 21 px pooled cell within 3 frames


def test_all_event_kinds_appear(streams: list[Stream]) -> None:
    seen = {e.kind for s in streams for e in s.events}
    assert seen == set(EVENT_KINDS)


def test_event_frame_ratio_in_band(streams: list[Stream]) -> None:
    ratios = [len(s.events) / s.num_frames for s in streams]
    assert all(0.12 <= r <= 0.30 for r in ratios), ratios
    assert 0.15 <= float(np.mean(ratios)) <= 0.25, ratios


def test_curriculum_stage_zero() -> None:
    config = curriculum(0)
    s = generate_stream(5, 400, config)
    assert max(len(st.objects) for st in s.states) <= 1
    assert {e.kind.value for e in s.events} <= set(config.event_kinds)
    assert all(st.clean for st in s.states)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        WorldConfig(max_objects=0)
    with pytest.raises(ValueError):
        WorldConfig(colours=("red", "teal"))
    with pytest.raises(ValueError):
        WorldConfig(event_kinds=("enter", "dim"))  # motion that could never end in an event
    with pytest.raises(ValueError):
        WorldConfig(event_kinds=("explode",))
    with pytest.raises(ValueError, match="mover_questions"):
        WorldConfig(mover_questions=1.5)


def test_generation_speed() -> None:
    start = time.perf_counter()
    for _ in iter_stream(99, num_frames=1500):
        pass
    fps = 1500 / (time.perf_counter() - start)
    assert fps > 1000, f"{fps:.0f} frames/s"


# ---- grammar ----


def test_every_narration_parses_back(streams: list[Stream]) -> None:
    for e in (e for s in streams for e in s.events):
        parsed = parse_narration(e.text)
        assert parsed is not None, e.text
        assert (parsed.kind, parsed.colour, parsed.shape) == (e.kind, e.colour, e.shape)
        assert (parsed.direction, parsed.new_colour) == (e.direction, e.new_colour)
    for text in all_narrations():
        p = parse_narration(text)
        assert (
            p is not None and narrate(p.kind, p.colour, p.shape, p.direction, p.new_colour) == text
        )


def test_parser_rejects_and_normalises() -> None:
    assert parse_narration("the red circle turns red") is None
    assert parse_narration("a red dog enters from the left") is None
    assert parse_narration("  The Lights come back on! ") is not None


def test_vocabulary_covers_the_world(streams: list[Stream]) -> None:
    sentences = all_sentences()
    assert len(sentences) == len(set(sentences))
    vocab = set(vocabulary())
    texts = [e.text for s in streams for e in s.events]
    texts += [t for s in streams for q in s.questions for t in (q.text, q.answer)]
    for text in texts:
        assert set(text.replace("?", " ?").split()) <= vocab, text


def test_questions_are_answerable(streams: list[Stream]) -> None:
    questions = [q for s in streams for q in s.questions]
    assert {q.kind for q in questions} == set(QuestionKind) - set(MOVER_KINDS)
    known = set(all_questions())
    for s in streams:
        for q in s.questions:
            state = s.states[q.frame_index]
            assert q.text in known and q.answer in answers_for(q.kind)
            if q.kind is QuestionKind.COUNT:
                assert q.answer == ("zero", "one", "two", "three")[len(state.objects)]
            if q.kind is QuestionKind.COLOUR:
                shape = q.text.split()[-1].rstrip("?")
                (obj,) = [o for o in state.objects if o.shape == shape]
                assert q.answer == obj.colour
            if q.kind is QuestionKind.DARK:
                assert q.answer == ("yes" if state.dark else "no")


def test_mover_questions_name_the_one_moving_object() -> None:
    """With mover_questions, frames where exactly one object moves ask for its colour and
    shape; the frames, events and the default world's questions stay as they were."""
    plain = generate_stream(7, 240)
    world = replace(WorldConfig(), mover_questions=1.0)
    probed = generate_stream(7, 240, world)
    assert np.array_equal(plain.frames, probed.frames) and plain.events == probed.events
    assert not any(q.kind in MOVER_KINDS for q in plain.questions)
    asked = [q for q in probed.questions if q.kind in MOVER_KINDS]
    movers = [st for st in probed.states if sum(o.moving for o in st.objects) == 1]
    assert len(asked) == len(movers) > 10  # at chance 1, every such frame asks one
    for q in asked:
        (mover,) = [o for o in probed.states[q.frame_index].objects if o.moving]
        assert q.object_id == mover.object_id and q.answer in answers_for(q.kind)
        assert q.answer == (mover.colour if q.kind is QuestionKind.MOVER_COLOUR else mover.shape)
        assert q.text == f"what {q.kind.value.split('_')[1]} is the moving object?"
    assert set(q.text for q in asked).isdisjoint(all_questions())  # not in the tokenizer corpus


def test_onset_questions_ask_on_the_frame_a_lone_move_starts() -> None:
    world = replace(WorldConfig(), onset_questions=1.0)
    s = generate_stream(7, 240, world)
    asked = {q.frame_index for q in s.questions if q.kind in MOVER_KINDS}
    onsets = {
        e.frame_index
        for e in s.events
        if e.kind.value == "move" and sum(o.moving for o in s.states[e.frame_index].objects) == 1
    }
    assert asked == onsets and len(onsets) >= 3
    with pytest.raises(ValueError, match="onset_questions"):
        WorldConfig(onset_questions=-0.1)


# ---- metrics ----


@pytest.fixture(scope="module")
def truth(streams: list[Stream]) -> Stream:
    return streams[0]


def test_perfect_predictions(truth: Stream) -> None:
    report = score_narrations(truth.narrations(), truth.events)
    for scores in (report.exact, report.kind, report.timing):
        assert scores.f1 == 1.0 and scores.time_diff_s == 0.0
        assert set(scores.recall_by_kind.values()) == {1.0}


def test_late_predictions(truth: Stream) -> None:
    late = [(t + 1.0, text) for t, text in truth.narrations()]
    scores = match_narrations(late, truth.events, window_s=2.0)
    assert scores.f1 == 1.0 and scores.time_diff_s == pytest.approx(1.0)
    too_late = [(t + 3.0, text) for t, text in truth.narrations()]
    assert match_narrations(too_late, truth.events, window_s=2.0).n_matched == 0
    early = [(t - 0.5, text) for t, text in truth.narrations()]
    assert match_narrations(early, truth.events).n_matched == 0
    assert match_narrations(early, truth.events, early_s=0.5).f1 == 1.0


def test_missing_and_spurious_predictions(truth: Stream) -> None:
    half = truth.narrations()[::2]
    scores = match_narrations(half, truth.events)
    assert scores.precision == 1.0
    assert scores.recall == pytest.approx(len(half) / len(truth.events))
    noisy = truth.narrations() + [(t + 0.2, "the scene changes") for t, _ in truth.narrations()]
    scores = match_narrations(noisy, truth.events)
    assert scores.recall == 1.0 and scores.precision == pytest.approx(0.5)
    assert match_narrations([], truth.events).f1 == 0.0
    assert match_narrations([], []).f1 == 1.0


def test_wrong_words_right_time(truth: Stream) -> None:
    swapped = []
    for t, text in truth.narrations():
        p = parse_narration(text)
        assert p is not None
        if p.colour is not None:
            other = next(c for c in ("red", "blue", "green") if c not in (p.colour, p.new_colour))
            text = narrate(p.kind, other, p.shape, p.direction, p.new_colour)
        swapped.append((t, text))
    report = score_narrations(swapped, truth.events)
    assert report.timing.f1 == 1.0 and report.kind.f1 == 1.0
    global_kinds = {EventKind.DIM, EventKind.BRIGHTEN, EventKind.CUT}
    n_global = sum(e.kind in global_kinds for e in truth.events)
    assert report.exact.n_matched == n_global


def test_wrong_details_say_what_was_wrong(streams: list[Stream]) -> None:
    """A move said of another object in view, a move in the wrong direction and a move of an
    object nobody can see are told apart; exact narrations are not counted."""
    wrong: dict[str, int] = {}
    n = 0
    for stream in streams:
        said = []
        for e, (t, text) in zip(stream.events, stream.narrations(), strict=True):
            if e.kind is EventKind.MOVE:
                others = [
                    o for o in stream.states[e.frame_index].objects if o.object_id != e.object_id
                ]
                shown = {(o.colour, o.shape) for o in stream.states[e.frame_index].objects}
                shown |= {(o.colour, o.shape) for o in stream.states[e.frame_index - 1].objects}
                unseen = next(
                    (c, s)
                    for c in ("red", "blue", "green", "yellow")
                    for s in ("star", "circle")
                    if (c, s) not in shown
                )
                direction = next(d for d in ("left", "right", "up", "down") if d != e.direction)
                why = ["direction", "object not in view", "object in view"][n % 3]
                if why == "object in view" and not others:
                    why = "direction"
                if why == "direction":
                    text = narrate(e.kind, e.colour, e.shape, direction)
                elif why == "object not in view":
                    text = narrate(e.kind, *unseen, e.direction)
                else:
                    text = narrate(e.kind, others[0].colour, others[0].shape, e.direction)
                wrong[why] = wrong.get(why, 0) + 1
                n += 1
            said.append((t, text))
        report = score_narrations(said, stream.events)
        got = wrong_details(said, stream.events, stream.states, report)
        for why, count in got.get("move", {}).items():
            wrong[why] -= count
        assert set(got) <= {"move"}  # the other events were said exactly
    assert n >= 3 and set(wrong.values()) == {0}


def test_question_accuracy(truth: Stream) -> None:
    questions = list(truth.questions)
    answers = [q.answer.upper() + "." for q in questions]
    assert question_accuracy(answers, questions) == 1.0
    answers[0] = "purple-ish"
    assert question_accuracy(answers, questions) == pytest.approx(1 - 1 / len(questions))


# ---- demo video ----


def test_demo_video_round_trip(tmp_path) -> None:
    out = tmp_path / "demo.mp4"
    video = render_demo_video(out, seed=3, seconds=10, size=128)
    assert video.num_frames == 20 and out.exists()
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (128, 128, 3)
        frames += 1
    cap.release()
    assert frames == 20
    truth = json.loads(out.with_suffix(".events.json").read_text())
    assert len(truth["events"]) == video.num_events
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.events.json", "demo.mp4"]


def test_demo_video_repeats_frames_for_higher_fps(tmp_path) -> None:
    video = render_demo_video(tmp_path / "d.mp4", seconds=2, fps=10, size=64, write_events=False)
    assert (video.fps, video.num_frames, video.world_frames) == (10.0, 20, 4)
    cap = cv2.VideoCapture(str(video.path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 20
    cap.release()


def test_demo_video_under_a_file_or_onto_a_folder_says_what_is_wrong(tmp_path) -> None:
    from onsight.runtime.errors import OnsightError

    (tmp_path / "x").write_text("")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OnsightError, match=r"x is a file, not a directory"):
        render_demo_video(tmp_path / "x" / "out.mp4", seconds=1, size=32)
    with pytest.raises(OnsightError, match="is a directory; give a file path"):
        render_demo_video(tmp_path / "dir.mp4", seconds=1, size=32)


def test_config_replace_keeps_story() -> None:
    """Pixel nuisances draw from their own generator, so noise does not change the events."""
    noisy = replace(WorldConfig(), shake_prob=1.0, noise_prob=1.0)
    clean = replace(WorldConfig(), shake_prob=1.0, noise_prob=1.0, noise_sigma=0.0, shake_px=0)
    a, b = generate_stream(4, 200, noisy), generate_stream(4, 200, clean)
    assert a.events == b.events
    assert not np.array_equal(a.frames, b.frames)


def test_recall_by_objects_in_view_separates_naming_alone_from_among_others(
    streams: list[Stream],
) -> None:
    """Object events are bucketed by how many objects were in view (event frame and the one
    before); a narrator that misses every move seen among others scores 1.0 alone and 0.0
    in the busier buckets; global events are not counted."""
    from onsight.runtime.synthetic import recall_by_objects_in_view

    totals: dict[str, list[int]] = {}
    for stream in streams:
        said = []
        for e, (t, text) in zip(stream.events, stream.narrations(), strict=True):
            frames = (e.frame_index, max(0, e.frame_index - 1))
            n = len({o.object_id for f in frames for o in stream.states[f].objects})
            if e.kind is EventKind.MOVE and n > 1:
                continue  # never said
            said.append((t, text))
        report = score_narrations(said, stream.events)
        got = recall_by_objects_in_view(stream.events, stream.states, report)
        assert all(e.object_id is not None for e in stream.events if e.kind.value in got)
        for bucket, (hit, total) in got.get("move", {}).items():
            assert hit == (total if bucket == "1" else 0)
            acc = totals.setdefault(bucket, [0, 0])
            acc[0], acc[1] = acc[0] + hit, acc[1] + total
        for kind, buckets in got.items():
            if kind != "move":
                assert all(hit == total for hit, total in buckets.values())
    assert sum(t for _, t in totals.values()) >= 3 and set(totals) - {"1"}, totals
