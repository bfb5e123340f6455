"""The embedding API under misuse: bad frames, timestamps, questions and config are refused
with what to do, close() is safe from another thread, and the CLI refuses bad numbers."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest

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


def test_ask_refuses_what_it_cannot_answer_and_answers_up_to_its_limit(demo):
    for bad in (None, 42, b"what"):
        with pytest.raises(OnsightError, match="must be a str"):
            demo.ask(bad)
    limit = demo.max_question_tokens()
    assert 50 < limit < demo.bundle.layout.capacity_mod
    words = limit
    while len(demo.tokens.encode("what " * words)) > limit:
        words -= 1
    with pytest.raises(OnsightError, match=f"at most {limit}.*shorter question"):
        demo.ask("what " * (limit + 5))
    for i in range(12):  # frames before it, so evictions have to make room
        demo.push(FRAME, i * 0.5)
    demo.ask("what " * words)
    events = demo.push(FRAME, 6.0)
    assert [type(e) for e in events] == [AnswerEvent]


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
    for call in (lambda: a.ask("hi"), a.reset, lambda: a.push(FRAME), a.stats):
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


def test_narrate_ends_with_one_stats_event_and_refuses_zero_frames(tmp_path):
    from onsight.runtime.capture import open_source

    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2

    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((32, 32, 3), i * 40, np.uint8))
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
