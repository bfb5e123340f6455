"""push() as robot code calls it: timestamps that are not seconds and frames in the wrong
range are refused with what to give, and a frame pushed while narrate() runs is refused
rather than mixed into the narrated stream's KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onsight.runtime.assistant import Assistant, AssistantConfig
from onsight.runtime.errors import OnsightError
from onsight.runtime.events import AnswerEvent, NarrationEvent, WarningEvent

DEMO = Path(__file__).resolve().parent.parent / "engines" / "demo"
FRAME = np.zeros((48, 64, 3), np.uint8)


@pytest.fixture(scope="module")
def demo():
    with Assistant(DEMO, AssistantConfig(stats_every=10**6)) as a:
        yield a


@pytest.mark.parametrize(
    "bad, says",
    [
        ("5", "got str '5'.*stamp.sec"),
        (b"5", "got bytes"),
        (True, "got bool"),
        (np.bool_(True), "got bool"),
        pytest.param(10**400, "too large", id="int-too-large-for-float"),
        (object(), "seconds as a number.*stamp.sec"),
    ],
)
def test_push_refuses_timestamps_that_are_not_seconds_and_counts_no_frame(demo, bad, says):
    before = demo.stats().frames_captured
    with pytest.raises(OnsightError, match=says):
        demo.push(FRAME, bad)
    assert demo.stats().frames_captured == before


@pytest.mark.parametrize("good", [3, np.float32(3.5), np.int64(4), np.float64(4.5)])
def test_push_takes_numbers_of_any_numeric_type_as_seconds(demo, good):
    demo.reset()  # timestamps start afresh: no warning for going back
    events = demo.push(FRAME, good)
    assert not any(isinstance(e, WarningEvent) for e in events)
    demo.ask("what is here?")
    (answer,) = [e for e in demo.push(FRAME, float(good) + 1) if isinstance(e, AnswerEvent)]
    assert type(answer.frame_timestamp) is float and answer.frame_timestamp == float(good) + 1


def test_float_frames_are_told_how_to_convert_either_range(demo):
    # scaling a 0..255 float frame by 255 would saturate it to white: both ranges are named
    with pytest.raises(OnsightError, match=r"\[0, 1\].*\* 255.*\[0, 255\]: img.clip\(0, 255\)"):
        demo.push(np.full((48, 64, 3), 200.0, np.float32), 0.0)


def test_push_while_narrate_runs_is_refused_and_the_stream_keeps_its_frames(shared_videos):
    cfg = AssistantConfig(fps=2, realtime=False, stats_every=10**6)
    video = str(shared_videos / "walk.mkv")
    with Assistant(DEMO, cfg) as a:
        events = a.narrate(video)
        first = next(events)  # the source is open: the stream is running
        with pytest.raises(OnsightError, match="narrating a source.*another Assistant"):
            a.push(FRAME, 123.0)
        said = [(e.frame_index, e.text) for e in [first, *events] if isinstance(e, NarrationEvent)]
        processed = a.stats().frames_processed
        a.push(FRAME, 1000.0)  # once narrate() has ended, pushing goes on
        assert a.stats().frames_processed == processed + 1
    # the refused frame left no trace: the stream narrated exactly as it does undisturbed
    with Assistant(DEMO, cfg) as clean:
        alone = [
            (e.frame_index, e.text) for e in clean.narrate(video) if isinstance(e, NarrationEvent)
        ]
        assert clean.stats().frames_processed == processed
    assert said == alone
