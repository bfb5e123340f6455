"""`onsight narrate --questions`: questions from a file, stdin or a FIFO while it narrates; a
question the bundle refuses is a warning event, an unreadable path an exit 2 before anything."""

from __future__ import annotations

import json
import os
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


def test_questions_from_a_fifo_are_asked_as_they_arrive(tmp_path, capsys):
    fifo = tmp_path / "questions"
    os.mkfifo(fifo)
    folder = image_folder(tmp_path, 8)  # 4 s at 2 fps, in real time

    def writer() -> None:
        time.sleep(1.0)  # narration is under way (a FIFO with no writer must not stall it)
        with open(fifo, "w") as f:
            f.write("how many objects are there?\n")

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
    out = events(capsys.readouterr().out)
    (answer,) = [e for e in out if e["type"] == "answer"]
    assert answer["question"] == "how many objects are there?" and answer["frame_index"] > 0


def test_questions_from_stdin(tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("how many objects are there?\n")
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
    assert [e["question"] for e in events(run.stdout) if e["type"] == "answer"] == [
        "how many objects are there?"
    ]


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
