"""Questions and stats from other threads: ask() and stats() never wait for the frame in
flight, ask()'s Future is completed by whichever call answers it and failed when no answer will
come (closed, a failed or interrupted step), and the robot example polls it."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from media_builders import image_folder

from onsight.runtime.assistant import Assistant, AssistantConfig
from onsight.runtime.errors import OnsightError
from onsight.runtime.events import AnswerEvent

DEMO = Path(__file__).resolve().parent.parent / "engines" / "demo"
FRAME = np.zeros((48, 64, 3), np.uint8)


@pytest.fixture()
def demo():
    with Assistant(DEMO, AssistantConfig(stats_every=10**6)) as a:
        yield a


def _frame_in_flight(
    a: Assistant, timestamp: float
) -> tuple[threading.Thread, threading.Event, list]:
    """push() a frame on another thread and hold it inside the frame step until the returned
    event is set; returns once the frame is in flight (and the list its events, or the
    OnsightError it raised, go to)."""
    inner = a._stepper.inner
    entered, release = threading.Event(), threading.Event()
    frame_step = inner.frame

    def slow_frame(*args, **kwargs):
        entered.set()
        release.wait(30)
        inner.frame = frame_step
        return frame_step(*args, **kwargs)

    inner.frame = slow_frame
    events: list = []

    def push() -> None:
        try:
            events.extend(a.push(FRAME, timestamp))
        except OnsightError as e:
            events.append(e)

    t = threading.Thread(target=push, daemon=True)
    t.start()
    assert entered.wait(30)
    return t, release, events


def test_ask_does_not_wait_for_the_frame_being_processed():
    a = Assistant(DEMO)
    t, release, events = _frame_in_flight(a, 0.0)
    started = time.perf_counter()
    a.ask("how many objects are there?")
    assert time.perf_counter() - started < 1.0
    release.set()
    t.join(30)
    events += a.push(FRAME, 0.5)  # answered after that frame or this one
    assert [type(e) for e in events] == [AnswerEvent]
    a.close()


def test_stats_does_not_wait_for_the_frame_being_processed():
    a = Assistant(DEMO)
    a.push(FRAME, 0.0)
    t, release, _ = _frame_in_flight(a, 0.5)
    started = time.perf_counter()
    during = a.stats()
    assert time.perf_counter() - started < 1.0
    assert during.frames_processed == 1  # as of the last frame done
    release.set()
    t.join(30)
    assert a.stats().frames_processed == 2
    a.close()


def test_ask_returns_a_future_another_thread_can_wait_on(demo):
    """A robot's planner thread asks and waits; the camera thread's push() answers."""
    got: list = []
    # asked here, so the push below takes it however late the waiter thread starts
    asked = demo.ask("how many objects are there?")
    waiter = threading.Thread(target=lambda: got.append(asked.result(timeout=30)))
    waiter.start()
    events = demo.push(FRAME, 0.0)
    waiter.join(30)
    (in_stream,) = [e for e in events if isinstance(e, AnswerEvent)]
    (answer,) = got
    assert isinstance(answer, AnswerEvent)
    assert (answer.question, answer.text, answer.frame_index) == (
        in_stream.question,
        in_stream.text,
        in_stream.frame_index,
    )
    assert type(answer.question) is str
    # answer_now() completes them too; several questions complete in the order asked
    first, second = demo.ask("what colour is the square?"), demo.ask("how many objects are there?")
    now = demo.answer_now()
    assert [first.result(0).text, second.result(0).text] == [e.text for e in now]


def test_a_question_with_bytes_that_are_not_utf8_is_answered(demo):
    """A command line's non-UTF-8 bytes reach ask() as lone surrogates (surrogateescape); the
    question is asked with U+FFFD in their place instead of failing inside the tokenizer."""
    raw = b"what colour is the squ\xe9re?"
    asked = demo.ask(raw.decode("utf-8", "surrogateescape"))
    demo.push(FRAME, 0.0)
    answer = asked.result(0)
    assert answer.question == "what colour is the squ\ufffdre?"
    assert answer.text


def test_pending_futures_fail_when_closed_and_a_cancelled_one_stays_cancelled():
    a = Assistant(DEMO)
    dropped, pending = a.ask("what colour is the square?"), a.ask("how many objects are there?")
    assert dropped.cancel()
    a.push(FRAME, 0.0)  # answers both: the cancelled one's answer is dropped, nothing raised
    assert dropped.cancelled() and pending.result(0).text
    late = a.ask("how many objects are there?")
    a.close()
    with pytest.raises(OnsightError, match="closed before the question was answered"):
        late.result(timeout=5)


def test_a_failed_frame_fails_the_futures_of_the_questions_it_took(demo):
    demo.push(FRAME, 0.0)
    asked = demo.ask("how many objects are there?")
    inner = demo._stepper.inner
    frame_step = inner.frame

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    inner.frame = broken
    with pytest.raises(OnsightError, match="inference failed"):
        demo.push(FRAME, 0.5)
    # the question was still queued when the frame step failed: it waits for the next frame
    assert not asked.done()
    inner.frame = frame_step
    text_step = inner.text
    inner.text = broken
    with pytest.raises(OnsightError, match="inference failed"):
        demo.push(FRAME, 1.0)
    with pytest.raises(OnsightError, match="device lost"):
        asked.result(timeout=5)
    inner.text = text_step


def _failing_once_a_question_is_taken(a: Assistant, error: BaseException):
    """Make the text step raise `error` once the step has taken a question from the queue
    (so it fails inside the question's turn, not in a narration before it)."""
    text_step = a._stepper.inner.text

    def text(*args, **kwargs):
        if a._loop.taken:
            raise error
        return text_step(*args, **kwargs)

    a._stepper.inner.text = text


def test_a_question_asked_while_the_failing_frame_ran_fails_too():
    """ask() on another thread while the frame is in flight: that frame takes the question,
    so its failure must fail the Future (it is in no snapshot taken before the step)."""
    a = Assistant(DEMO)
    t, release, events = _frame_in_flight(a, 0.0)
    asked = a.ask("how many objects are there?")
    _failing_once_a_question_is_taken(a, RuntimeError("device lost"))
    release.set()
    t.join(30)
    (error,) = events
    assert isinstance(error, OnsightError) and "inference failed" in str(error)
    with pytest.raises(OnsightError, match="device lost"):
        asked.result(timeout=5)
    a.close()


def test_an_interrupted_step_fails_the_futures_it_took_and_still_raises_the_interrupt(demo):
    demo.push(FRAME, 0.0)
    first = demo.ask("how many objects are there?")
    _failing_once_a_question_is_taken(demo, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        demo.push(FRAME, 0.5)
    with pytest.raises(OnsightError, match="inference failed at frame 1"):
        first.result(timeout=5)
    second = demo.ask("how many objects are there?")
    with pytest.raises(KeyboardInterrupt):
        demo.answer_now()
    with pytest.raises(OnsightError, match="answering failed"):
        second.result(timeout=5)


def test_robot_example_logs_the_answer_its_control_loop_polls(tmp_path, caplog):
    from onsight.runtime import robot_example

    folder = image_folder(tmp_path, 6)
    with caplog.at_level("INFO", logger="robot"):
        rc = robot_example.main(
            ["--engine", str(DEMO), "--source", str(folder), "--seconds", "8", "--hz", "50"]
        )
    assert rc == 0
    # at the first frame, or a later one if the perception thread got there first
    assert re.search(r"answered at t=\d+\.\ds: ", caplog.text)
