"""`onsight narrate`: a source narrated headless, one JSON event per line on stdout (and in a
transcript), with questions from the command line and, with `--questions`, from a stream read
while it narrates (stdin, a FIFO another process writes, or a file: runtime/question_stream.py)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import threading

from onsight.runtime.events import Event
from onsight.runtime.question_stream import Questions, check_questions, start_questions


class EventOut:
    """Prints each event as a JSON line (flushed) and appends it to the transcript; one lock,
    so lines from the narration and from the question reader never interleave. Lines carry
    non-decreasing wall_times: an event stamped on one thread just before another thread's
    event took the lock is printed with the later stamp (they differ by microseconds)."""

    def __init__(self, transcript=None):
        self.transcript = transcript
        self._lock = threading.Lock()
        self._last = -math.inf

    def emit(self, event: Event) -> None:
        with self._lock:
            if event.wall_time < self._last:
                event = dataclasses.replace(event, wall_time=self._last)
            self._last = event.wall_time
            line = event.to_json()
            print(line, flush=True)
            if self.transcript:
                self.transcript.append(line)

    def close(self) -> None:
        """Close the transcript; a late event from the reader is then printed only."""
        with self._lock:
            transcript, self.transcript = self.transcript, None
        if transcript:
            transcript.close()


def cmd_narrate(a: argparse.Namespace) -> int:
    from onsight.runtime.assistant import Assistant, AssistantConfig
    from onsight.runtime.transcript import Transcript

    if a.questions:
        check_questions(a.questions)  # before the bundle loads: a mistyped path fails at once
    cfg = AssistantConfig(
        backend=a.backend,
        fps=a.fps,
        realtime=not a.no_realtime,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        decode_workers=a.decode_workers,
        skip_duplicate_frames=a.skip_duplicates,
        prune_static_tokens=a.prune_static,
    )
    out = EventOut()
    questions: Questions | None = None
    try:
        with Assistant(a.engine, cfg) as assistant:
            for q in a.ask or []:
                assistant.ask(q)
            # opened once the bundle and questions are good, so a refused run leaves no file
            out.transcript = Transcript(a.transcript) if a.transcript else None
            if a.questions:
                questions = start_questions(a.questions, assistant, out.emit)
            for event in assistant.narrate(a.source, max_frames=a.max_frames):
                out.emit(event)
            if questions:
                questions.stop()  # each question asked by now is answered just below
            # questions that came in during the last frame: answered from what was seen
            for event in assistant.answer_now():
                out.emit(event)
    finally:
        if questions:
            questions.stop()  # also on Ctrl-C or an error: the reader reports nothing more
        out.close()
    return 0


def add_question_flags(n: argparse.ArgumentParser) -> None:
    n.add_argument(
        "--ask", action="append", help="a question to ask at the first frame (repeatable)"
    )
    n.add_argument(
        "--questions",
        metavar="FILE",
        help="also ask each line of FILE (UTF-8, one question a line): a file is read at the "
        "start and answered at the first frame; - (stdin: typed or piped) or a FIFO another "
        "process writes (mkfifo; each `echo QUESTION > FIFO` is read) is read as lines arrive "
        "while narrating, each answered after the next frame",
    )


__all__ = ["EventOut", "add_question_flags", "cmd_narrate"]
