"""`onsight narrate --questions`: questions from a file, stdin or a FIFO while it narrates; a
question the bundle refuses is a warning event, an unreadable path an exit 2 before anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from media_builders import image_folder

from onsight.runtime.cli import main

DEMO = Path(__file__).resolve().parent.parent / "engines" / "demo"
TOO_LONG = "what colour is the square " * 40

pytestmark = pytest.mark.skipif(
    not (DEMO / "bundle.json").is_file(), reason="the shipped demo bundle is missing"
)


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_questions_from_a_file_are_answered_and_a_refused_one_is_a_warning(tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text(f"how many objects are there?\n\n{TOO_LONG}\nwhat colour is the square?\n")
    transcript = tmp_path / "t.jsonl"
    argv = ["narrate", "--engine", str(DEMO), "--source", str(image_folder(tmp_path, 4))]
    argv += ["--no-realtime", "--questions", str(questions), "--transcript", str(transcript)]
    assert main(argv) == 0
    out = events(capsys.readouterr().out)
    answers = [e for e in out if e["type"] == "answer"]
    assert [a["question"] for a in answers] == [
        "how many objects are there?",
        "what colour is the square?",
    ]
    assert all(a["frame_index"] == 0 and a["text"] for a in answers)  # asked before frame 0
    (warning,) = [e for e in out if e["type"] == "warning"]
    assert "question not asked" in warning["message"] and "tokens" in warning["message"]
    assert events(transcript.read_text()) == out


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "onsight-questions"]


def wait_for_no_reader(timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not reader_threads(), "the question reader outlived the narration"


def test_questions_from_a_fifo_are_asked_as_they_arrive_writer_after_writer(tmp_path, capsys):
    fifo = tmp_path / "questions"
    os.mkfifo(fifo)
    folder = image_folder(tmp_path, 8)  # 4 s at 2 fps, in real time
    asked = ["how many objects are there?", "what colour is the square?"]

    def writer() -> None:
        time.sleep(1.0)  # narration is under way (a FIFO with no writer must not stall it)
        for q in asked:  # `echo q > fifo`, twice: the first writer's close must not end it
            with open(fifo, "w") as f:
                f.write(q + "\n")
            time.sleep(0.5)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert (
        main(
            ["narrate", "--engine", str(DEMO), "--source", str(folder), "--fps", "2"]
            + ["--questions", str(fifo)]
        )
        == 0
    )
    t.join(10)
    assert not t.is_alive(), "a writer was left waiting for a reader"
    out = events(capsys.readouterr().out)
    answers = [e for e in out if e["type"] == "answer"]
    assert [a["question"] for a in answers] == asked
    assert all(a["frame_index"] > 0 for a in answers)
    wait_for_no_reader()


def test_a_fifo_nobody_writes_neither_stalls_narration_nor_outlives_it(tmp_path, capsys):
    fifo = tmp_path / "questions"
    os.mkfifo(fifo)
    argv = ["narrate", "--engine", str(DEMO), "--source", str(image_folder(tmp_path, 2))]
    assert main(argv + ["--no-realtime", "--questions", str(fifo)]) == 0
    assert [e for e in events(capsys.readouterr().out) if e["type"] == "stats"]
    wait_for_no_reader()


def test_questions_from_stdin_not_utf8_or_overlong_lines_do_not_end_it(tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_bytes(
        b"what colour is the square? \xff\xfe\n"  # not UTF-8: read as U+FFFD
        + b"x" * 70_000  # a line no question is: skipped, never held whole
        + b"\nhow many objects are there?\n"
    )
    with open(questions) as stdin:
        run = subprocess.run(
            [sys.executable, "-m", "onsight.runtime.cli", "narrate", "--engine", str(DEMO)]
            + ["--source", str(image_folder(tmp_path, 2)), "--no-realtime", "--questions", "-"],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 0, run.stderr
    out = events(run.stdout)
    assert [e["question"] for e in out if e["type"] == "answer"] == [
        "what colour is the square? \ufffd\ufffd",
        "how many objects are there?",
    ]
    (warning,) = [e for e in out if e["type"] == "warning"]
    assert "skipped a line of over" in warning["message"]


@pytest.mark.timeout(120)
def test_ctrl_c_with_questions_on_stdin_exits_130_and_leaves_the_transcript_whole(tmp_path):
    transcript = tmp_path / "t.jsonl"
    # a terminal's Ctrl-C: SIGINT raises KeyboardInterrupt even if this process ignores it
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from onsight.runtime.cli import main; sys.exit(main())"
    )
    argv = [sys.executable, "-c", code, "narrate", "--engine", str(DEMO), "--fps", "2"]
    argv += ["--source", str(image_folder(tmp_path, 40)), "--questions", "-"]  # 20 s
    argv += ["--transcript", str(transcript)]
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    printed = []
    try:
        p.stdin.write("how many objects are there?\n")  # stdin stays open, as a terminal's
        p.stdin.flush()
        while not any(e["type"] == "answer" for e in printed):
            line = p.stdout.readline()
            assert line, p.stderr.read()
            printed += events(line)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    printed += events(rest)
    written = events(transcript.read_text())  # every line whole, each one printed, in order
    assert written == printed[: len(written)] and len(written) >= len(printed) - 1


def test_a_closed_stdin_exits_2_before_the_bundle_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # `onsight narrate ... <&-`
    argv = ["narrate", "--engine", str(tmp_path / "no-bundle"), "--source", "demo"]
    assert main(argv + ["--questions", "-"]) == 2
    captured = capsys.readouterr()
    assert "--questions -: stdin is closed" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    "make, problem", [(lambda p: p / "nope.txt", "no such file"), (lambda p: p, "a folder")]
)
def test_an_unreadable_questions_path_exits_2_before_any_output(tmp_path, capsys, make, problem):
    transcript = tmp_path / "t.jsonl"
    argv = ["narrate", "--engine", str(DEMO), "--source", str(image_folder(tmp_path, 2))]
    argv += ["--questions", str(make(tmp_path)), "--transcript", str(transcript)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert f"--questions {make(tmp_path)}: {problem}" in captured.err and "mkfifo" in captured.err
    assert captured.out == "" and not transcript.exists()


def test_output_lines_carry_non_decreasing_wall_times(capsys):
    """The narration and the question reader emit from two threads: an event stamped just
    before the other thread's took the output lock goes out with the later stamp."""
    from onsight.runtime.events import SourceEvent, WarningEvent
    from onsight.runtime.narrate_cli import EventOut

    out = EventOut()
    out.emit(WarningEvent(message="later", wall_time=10.5))
    out.emit(SourceEvent(status="opened", source="x", message="", wall_time=10.25))
    out.emit(WarningEvent(message="after", wall_time=11.0))
    times = [json.loads(line)["wall_time"] for line in capsys.readouterr().out.splitlines()]
    assert times == [10.5, 10.5, 11.0]
