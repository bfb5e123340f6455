"""`onsight narrate`: a source narrated headless, one JSON event per line on stdout (and in a
transcript), with questions from the command line and, with `--questions`, from a stream read
while it narrates (stdin, a FIFO another process writes, or a file)."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import threading
from pathlib import Path

from onsight.runtime.errors import OnsightError
from onsight.runtime.events import Event

log = logging.getLogger(__name__)


class EventOut:
    """Prints each event as a JSON line (flushed) and appends it to the transcript; one lock,
    so lines from the narration and from the question reader never interleave."""

    def __init__(self, transcript=None):
        self.transcript = transcript
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        line = event.to_json()
        with self._lock:
            print(line, flush=True)
            if self.transcript:
                self.transcript.append(line)

    def close(self) -> None:
        """Close the transcript; a late event from the reader is then printed only."""
        with self._lock:
            transcript, self.transcript = self.transcript, None
        if transcript:
            transcript.close()


def is_regular_file(spec: str) -> bool:
    """A file read whole at once (also stdin redirected from one): its questions are asked
    before the first frame, so which frame answers them does not depend on thread timing."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode if spec == "-" else os.stat(spec).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(mode)


def ask_lines(lines, assistant, out: EventOut) -> None:
    """Ask each non-blank line; a refused one becomes a warning event."""
    for line in lines:
        if assistant.closed:
            return
        if not line.strip():
            continue
        try:
            assistant.ask(line)
        except OnsightError as e:
            if assistant.closed:
                return
            out.emit(assistant.warn(f"question not asked: {e}"))


def read_questions(spec: str, assistant, out: EventOut) -> None:
    """Ask every non-blank line of `spec` (`-`: stdin) as it arrives; a question the assistant
    refuses (too long for the bundle's KV cache, say) becomes a warning event, not an exit.
    A FIFO or terminal is opened and read on a thread of its own (it blocks until its writer
    opens it, and narration must not wait for that). Ends at the stream's end or when the
    assistant is closed."""
    try:
        stream = sys.stdin if spec == "-" else open(spec, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        out.emit(assistant.warn(f"--questions {spec}: cannot read it ({e.strerror}); no questions"))
        return
    try:
        ask_lines(stream, assistant, out)
    except (OSError, ValueError) as e:  # the stream was closed under us
        log.debug("question stream ended: %s", e)
    finally:
        if stream is not sys.stdin:
            stream.close()


def check_questions(spec: str) -> None:
    """Refuse up front a --questions path that cannot be read (`-` is stdin)."""
    if spec == "-":
        return
    path = Path(spec)
    problem = (
        "no such file"
        if not path.exists()
        else "a folder"
        if path.is_dir()
        else "not readable"
        if not os.access(path, os.R_OK)
        else None
    )
    if problem:
        raise OnsightError(
            f"--questions {spec}: {problem}; give a file, a FIFO another process writes "
            "(mkfifo), or - for stdin"
        )


def cmd_narrate(a: argparse.Namespace) -> int:
    from onsight.runtime.assistant import Assistant, AssistantConfig
    from onsight.runtime.transcript import Transcript

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
    try:
        with Assistant(a.engine, cfg) as assistant:
            for q in a.ask or []:
                assistant.ask(q)
            if a.questions:
                check_questions(a.questions)
            # opened once the bundle and questions are good, so a refused run leaves no file
            out.transcript = Transcript(a.transcript) if a.transcript else None
            if a.questions and is_regular_file(a.questions):
                read_questions(a.questions, assistant, out)  # all of it, now
            elif a.questions:
                threading.Thread(
                    target=read_questions,
                    args=(a.questions, assistant, out),
                    name="onsight-questions",
                    daemon=True,  # a reader blocked on stdin must not keep the process alive
                ).start()
            for event in assistant.narrate(a.source, max_frames=a.max_frames):
                out.emit(event)
            # questions that came in during the last frame: answered from what was seen
            for event in assistant.answer_now():
                out.emit(event)
    finally:
        out.close()
    return 0


def add_question_flags(n: argparse.ArgumentParser) -> None:
    n.add_argument(
        "--ask", action="append", help="a question to ask at the first frame (repeatable)"
    )
    n.add_argument(
        "--questions",
        metavar="FILE",
        help="also ask each line of FILE as it arrives while narrating: - for stdin, or a FIFO "
        "another process writes (mkfifo); each answer is an answer event after the next frame",
    )


__all__ = [
    "EventOut",
    "add_question_flags",
    "ask_lines",
    "check_questions",
    "cmd_narrate",
    "is_regular_file",
    "read_questions",
]
