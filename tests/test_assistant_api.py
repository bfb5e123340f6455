"""The embedding API under misuse: bad frames, timestamps, questions and config are refused
with what to do, close() is safe from another thread, and the CLI refuses bad numbers."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from media_builders import image_folder

from onsight.runtime.assistant import Assistant, AssistantConfig
from onsight.runtime.bundle import load_bundle, resolve_engine
from onsight.runtime.errors import BundleError, EngineError, OnsightError
from onsight.runtime.events import AnswerEvent, StatsEvent, WarningEvent
from onsight.runtime.transcript import Transcript

DEMO = Path(__file__).resolve().parent.parent / "engines" / "demo"
FRAME = np.zeros((48, 64, 3), np.uint8)


@pytest.fixture()
def demo():
    with Assistant(DEMO, AssistantConfig(stats_every=10**6)) as a:
        yield a


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0},
        {"fps": -1.0},
        {"fps": float("nan")},
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"threads": 0},
        {"decode_workers": 0},
        {"duplicate_threshold": 0.0},
        {"prune_ratio": 1.0},
        {"stats_every": 0},
    ],
)
def test_config_refuses_out_of_range_values(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(OnsightError, match=f"{name}=.*give"):
        AssistantConfig(**kwargs)


@pytest.mark.parametrize(
    "image, hint",
    [
        (np.zeros((48, 64), np.uint8), "grayscale"),
        (np.zeros((48, 64, 4), np.uint8), "RGBA"),
        (np.zeros((3, 48, 64), np.uint8), "transpose"),
        (np.zeros((1, 48, 64, 3), np.uint8), "one frame at a time"),
        (np.zeros((48, 64, 3), np.float32), r"\* 255"),
        (np.zeros((0, 64, 3), np.uint8), "empty"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_push_refuses_bad_frames_with_a_hint_and_counts_none(demo, image, hint):
    with pytest.raises(OnsightError, match=hint):
        demo.push(image, 0.0)
    events = demo.push(FRAME, 0.0)  # the stream goes on; the refused frame took no index
    assert demo.stats().frames_captured == 1
    assert not any(isinstance(e, WarningEvent) for e in events)


def test_push_refuses_bad_timestamps_and_warns_when_they_go_back(demo):
    for bad in (float("nan"), float("inf"), "abc"):
        with pytest.raises(OnsightError, match="timestamp"):
            demo.push(FRAME, bad)
    assert not [e for e in demo.push(FRAME, 5.0) if isinstance(e, WarningEvent)]
    warned = [e for e in demo.push(FRAME, 4.0) if isinstance(e, WarningEvent)]
    assert len(warned) == 1 and "earlier than the last" in warned[0].message


def _answer_turn_tokens(a: Assistant) -> int:
    """Tokens of the newest turn in the cache: the question just answered, and its answer."""
    from onsight.runtime.kv_policy import TURN

    table = a._stepper.inner.cache.table
    groups = table.groups[table.kinds == TURN]
    return int((groups == groups.max()).sum())


def test_ask_refuses_what_it_cannot_answer_and_answers_up_to_its_limit(demo):
    for bad in (None, 42, b"what"):
        with pytest.raises(OnsightError, match="must be a str"):
            demo.ask(bad)
    limit = demo.max_question_tokens()
    assert 30 < limit < demo.bundle.layout.capacity_mod
    words = limit
    while len(demo.tokens.encode("what " * words)) > limit:
        words -= 1
    n = len(demo.tokens.encode("what " * words))
    with pytest.raises(OnsightError, match=f"at most {limit}.*shorter question"):
        demo.ask("what " * (limit + 5))
    for i in range(40):  # frames before it: the cache is nearly full and must evict
        demo.push(FRAME, i * 0.5)
    evictions = demo.stats().evictions
    demo.ask("what " * words)
    events = demo.push(FRAME, 20.0)
    assert [type(e) for e in events] == [AnswerEvent]
    assert demo.stats().evictions > evictions  # room was made while it was answered ...
    assert _answer_turn_tokens(demo) >= n  # ... and the question stayed in the cache


def test_a_long_answer_turn_is_not_evicted_from_under_itself():
    """Regression: an eviction while decoding dropped the turn being decoded when it alone
    exceeded the text budget, so the answer lost its question."""
    from onsight.runtime.kv_policy import TURN, EvictionPolicy, TokenTable

    table = TokenTable(k=2)
    table.append(5, 0, table.new_group())  # system prompt
    for _ in range(3):
        table.append(10, 1, table.new_group(), vision=True)
    turn = table.new_group()
    table.append(30, TURN, turn)  # longer than the text budget below
    policy = EvictionPolicy(keep_text_tokens=8)
    plan = table.plan(policy, 60, 60, routed=False, new_dense=1, protect=turn)
    assert plan.keep[table.groups == turn].all()
    # a finished turn is not protected: the budget drops it before the frames
    plan = table.plan(policy, 60, 60, routed=False, new_dense=1)
    assert not plan.keep[table.groups == turn].any() and plan.keep[table.vision].sum() > 0


def test_answer_now_answers_from_what_was_seen_without_a_frame(demo):
    demo.ask("how many objects are there?")
    assert demo.answer_now() == []  # nothing seen yet: it waits for the first frame
    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(6)]
    events = [e for i, f in enumerate(frames) for e in demo.push(f, i * 0.5)]
    assert [type(e) for e in events if isinstance(e, AnswerEvent)] == [AnswerEvent]
    demo.ask("what colour is the square?")
    (answer,) = demo.answer_now()  # e.g. after the file ended
    assert isinstance(answer, AnswerEvent) and answer.frame_index == 5
    assert answer.frame_timestamp == 2.5 and answer.text
    demo.push(frames[0], 3.0)  # the stream goes on after it
    assert demo.stats().frames_processed == 7


def test_answers_too_long_for_any_question_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="onsight.runtime.assistant"):
        with Assistant(DEMO, AssistantConfig(max_new_tokens=120)) as a:
            assert a.max_question_tokens() == 0
    assert "room for questions of only 0 tokens" in caplog.text
    with pytest.raises(OnsightError, match="lower --max-new-tokens"):
        Assistant(DEMO, AssistantConfig(max_new_tokens=120)).ask("hi")


def test_reset_keeps_questions_already_asked(demo):
    demo.push(FRAME, 0.0)
    demo.ask("how many objects are there?")
    demo.reset()
    events = demo.push(FRAME, 0.5)
    assert [e.question for e in events if isinstance(e, AnswerEvent)] == [
        "how many objects are there?"
    ]


def test_every_verb_on_a_closed_assistant_says_it_is_closed():
    a = Assistant(DEMO)
    a.close()
    a.close()  # twice is fine
    for call in (lambda: a.ask("hi"), a.reset, lambda: a.push(FRAME), a.stats, a.__enter__):
        with pytest.raises(OnsightError, match="closed"):
            call()


def test_close_from_another_thread_while_frames_are_in_flight():
    big = np.zeros((720, 1280, 3), np.uint8)
    for _ in range(4):
        a = Assistant(DEMO)
        errors: list[BaseException] = []
        started = threading.Event()

        def push_forever(a=a, errors=errors, started=started):
            try:
                while True:
                    a.push(big, 0.0)
                    started.set()
            except BaseException as e:  # noqa: BLE001 - the test inspects the type
                errors.append(e)
                started.set()

        t = threading.Thread(target=push_forever)
        t.start()
        started.wait(30)
        a.close()
        t.join(30)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], OnsightError), errors
        assert "closed" in str(errors[0])


def test_close_from_inside_a_call_on_the_same_thread_does_not_hang():
    """A signal handler or callback closing the Assistant mid-push: the push ends, then the
    sessions are released (close() must not wait for its own thread)."""
    a = Assistant(DEMO)
    encode = a.backend.encode

    def encode_then_close(pixels):
        out = encode(pixels)
        a.close()  # as a SIGINT handler would, while this thread is inside push()
        return out

    a.backend.encode = encode_then_close
    done = threading.Event()
    result: list = []

    def run():
        try:
            a.push(FRAME, 0.0)
        except OnsightError as e:
            result.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), "close() from inside push() deadlocked"
    assert result and "closed" in str(result[0])
    assert a._released
    with pytest.raises(OnsightError, match="closed"):
        a.ask("hi")


def test_close_from_inside_reset_on_the_same_thread_releases_after_it():
    a = Assistant(DEMO)
    a.push(FRAME, 0.0)
    inner = a._stepper.inner
    real_reset = inner.reset

    def reset_then_close():
        real_reset()
        a.close()  # a signal handler landing inside reset()

    inner.reset = reset_then_close
    a.reset()  # finishes with the sessions it started with
    assert a._released
    with pytest.raises(OnsightError, match="closed"):
        a.stats()


def test_close_ends_a_narrate_waiting_on_a_stalled_live_source():
    from onsight.runtime.capture.live import LiveSource
    from onsight.runtime.capture.sources import SourceKind

    class Stalled:  # a camera that opened and then never delivers a frame
        def grab(self):
            time.sleep(30)

        def retrieve(self):
            return FRAME

        def describe(self):
            return "stalled"

        def release(self):
            pass

    # its close() waits up to close_timeout_s for the stuck read, then leaves the thread
    src = LiveSource(
        "stalled", SourceKind.CAMERA, Stalled(), fps=None, reopen=None, close_timeout_s=1.0
    )
    a = Assistant(DEMO)
    out: list = []
    t = threading.Thread(target=lambda: out.extend(a.narrate(src)), daemon=True)
    t.start()
    time.sleep(0.5)
    started = time.perf_counter()
    a.close()
    t.join(10)
    assert not t.is_alive(), "narrate() kept waiting on its source after close()"
    assert time.perf_counter() - started < 5
    assert not any(isinstance(e, StatsEvent) for e in out)


def test_close_stops_the_threads_of_a_narrate_left_suspended(tmp_path):
    folder = image_folder(tmp_path, 12)
    a = Assistant(DEMO, AssistantConfig(realtime=False))
    events = a.narrate(str(folder))
    next(events)  # the caller keeps the generator and walks away
    a.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pipeline_threads():
        time.sleep(0.05)
    assert not _pipeline_threads()
    events.close()


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pipeline")]


def test_one_assistant_narrates_one_stream_at_a_time(tmp_path):
    folder = image_folder(tmp_path, 4)
    with Assistant(DEMO, AssistantConfig(realtime=False)) as a:
        first = a.narrate(str(folder))
        next(first)  # running
        with pytest.raises(OnsightError, match="already narrating.*another Assistant"):
            next(a.narrate(str(folder)))
        rest = list(first)
    assert any(isinstance(e, StatsEvent) for e in rest)


def test_pushes_from_several_threads_without_timestamps_stay_in_order(demo):
    warned: list = []

    def pusher():
        for _ in range(25):
            warned.extend(e for e in demo.push(FRAME) if isinstance(e, WarningEvent))

    threads = [threading.Thread(target=pusher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert demo.stats().frames_processed == 100 and not warned


def test_narrate_ends_with_one_stats_event_and_refuses_zero_frames(tmp_path):
    from onsight.runtime.capture import open_source

    folder = image_folder(tmp_path, 6)
    with Assistant(DEMO, AssistantConfig(stats_every=3, realtime=False)) as a:
        with pytest.raises(OnsightError, match="max_frames"):
            next(a.narrate(str(folder), max_frames=0))
        events = list(a.narrate(open_source(str(folder), fps=2.0, realtime=False), max_frames=6))
    stats = [e for e in events if isinstance(e, StatsEvent)]
    assert [s.frames_processed for s in stats] == [3, 6]  # the last one not repeated


# ---- bundles, transcripts, backends ----


def test_default_engine_resolves_to_the_shipped_demo_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_engine("engines/demo") == DEMO
    assert load_bundle("engines/demo", verify=False).path == DEMO
    assert resolve_engine("engines/other") == Path("engines/other")


def _demo_copy(tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(DEMO, tmp_path / "b"))


@pytest.mark.parametrize(
    "content, match", [(b"[]", "JSON list, not an object"), (b"\xff\xfe{", "not valid JSON")]
)
def test_malformed_bundle_json_is_a_bundle_error(tmp_path, content, match):
    b = _demo_copy(tmp_path)
    (b / "bundle.json").write_bytes(content)
    with pytest.raises(BundleError, match=match):
        load_bundle(b)


def test_unreadable_tokenizer_is_a_bundle_error(tmp_path):
    b = _demo_copy(tmp_path)
    (b / "tokenizer.json").write_text("{}")
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["files"].pop("tokenizer.json", None)
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="tokenizer.*re-export"):
        Assistant(b)


def test_tensorrt_backend_without_tensorrt_says_what_to_do():
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from onsight.runtime.trt_backend import TrtBackend

    bundle = load_bundle(DEMO, verify=False)
    fake = dataclasses.replace(bundle, manifest={**bundle.manifest, "tensorrt": {"plans": {}}})
    with pytest.raises(EngineError, match="--backend onnxruntime"):
        TrtBackend(fake)


def test_transcript_under_a_file_or_on_a_full_disk_is_an_onsight_error(tmp_path):
    (tmp_path / "video.mp4").write_bytes(b"x")
    with pytest.raises(OnsightError, match="is a file, not a folder"):
        Transcript(tmp_path / "video.mp4" / "t.jsonl")
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    t = Transcript("/dev/full")
    with pytest.raises(OnsightError, match="cannot write transcript /dev/full"):
        t.append('{"type": "narration"}')
    t.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["narrate", "--source", "demo", "--fps", "0"],
        ["narrate", "--source", "demo", "--fps", "nan"],
        ["narrate", "--source", "demo", "--max-frames", "0"],
        ["narrate", "--source", "demo", "--max-new-tokens", "-1"],
        ["narrate", "--source", "demo", "--temperature", "-1"],
        ["narrate", "--source", "demo", "--decode-workers", "0"],
        ["info", str(DEMO), "--budget-mb", "-5"],
    ],
)
def test_cli_refuses_out_of_range_numbers(argv, capsys):
    from onsight.runtime.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "give" in capsys.readouterr().err


def test_narrate_refused_before_it_starts_leaves_no_transcript(tmp_path, capsys):
    from onsight.runtime.cli import main

    t = tmp_path / "t.jsonl"
    code = main(
        ["narrate", "--engine", str(tmp_path / "nope"), "--source", "demo"]
        + [
            "--transcript",
            str(t),
        ]
    )
    assert code == 2 and not t.exists()


def test_skipped_duplicate_frames_are_counted_apart_from_dropped_ones():
    """frames_dropped means inference fell behind; a near-duplicate frame skipped on purpose
    is frames_skipped."""
    frame = np.full((64, 64, 3), 90, np.uint8)
    with Assistant(DEMO, AssistantConfig(skip_duplicate_frames=True, stats_every=10**6)) as a:
        for i in range(3):
            a.push(frame, i * 0.5)
        st = a.stats()
    assert (st.frames_processed, st.frames_skipped, st.frames_dropped) == (1, 2, 0)


# ---- wall_time: when an event is handed out, never decreasing ----


def test_an_ended_event_read_before_the_last_frames_is_stamped_after_their_stats():
    """Regression: the capture thread makes "ended" when it reads the end, while frames it
    read before are still in flight; its wall_time was earlier than their StatsEvents'."""
    from onsight.runtime.capture import Source, SourceKind
    from onsight.runtime.events import SourceEvent
    from onsight.runtime.frames import Frame

    class EndsEarly(Source):
        def __init__(self):
            super().__init__("ends-early", SourceKind.FILE)
            self.ended = self._event("ended", "end of input")  # read before any frame is done

        def __iter__(self):
            for i in range(3):
                yield Frame(FRAME, i * 0.5, i)
            yield self.ended

        def close(self):
            pass

    src = EndsEarly()
    time.sleep(0.01)  # the frames' events are made strictly later than the end was read
    with Assistant(DEMO, AssistantConfig(stats_every=1, realtime=False)) as a:
        events = list(a.narrate(src))
    times = [e.wall_time for e in events]
    assert times == sorted(times)
    assert [type(e) for e in events[-2:]] == [StatsEvent, SourceEvent]
    assert events[-1].status == "ended" and events[-1].wall_time > src.ended.wall_time


def test_event_clock_never_goes_back_when_the_wall_clock_does():
    from onsight.runtime.events import EventClock, WarningEvent

    readings = iter([100.0, 99.0, 101.0])  # the system clock stepped back in between
    clock = EventClock(lambda: next(readings))
    made = [WarningEvent(m, wall_time=0.0) for m in "abc"]
    stamped = clock.stamp_all(made)
    assert [e.wall_time for e in stamped] == [100.0, 100.0, 101.0]
    assert [e.message for e in stamped] == ["a", "b", "c"]


def test_events_of_push_answer_now_and_stats_share_one_non_decreasing_clock(demo):
    demo.ask("how many objects are there?")
    events = [e for i in range(3) for e in demo.push(FRAME, i * 0.5)]
    demo.ask("what colour is the square?")
    events += demo.answer_now()
    events.append(demo.stats())
    assert [type(e) for e in events[-2:]] == [AnswerEvent, StatsEvent]
    times = [e.wall_time for e in events]
    assert times == sorted(times) and times[0] > 0
