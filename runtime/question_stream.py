"""`onsight narrate --questions`: questions read while a source is narrated, from stdin, a FIFO
another process writes, or a file, and asked of the Assistant as they arrive."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from onsight.runtime.errors import OnsightError
from onsight.runtime.events import Event

log = logging.getLogger(__name__)


MAX_LINE_CHARS = 1 << 16  # a longer line (a binary file, say) is skipped, never held whole


def _mode(spec: str) -> int | None:
    try:
        return os.fstat(sys.stdin.fileno()).st_mode if spec == "-" else os.stat(spec).st_mode
    except (AttributeError, OSError, ValueError):  # no stdin, or one without a descriptor
        return None


def is_regular_file(spec: str) -> bool:
    """A file read whole at once (also stdin redirected from one): its questions are asked
    before the first frame, so which frame answers them does not depend on thread timing."""
    mode = _mode(spec)
    return mode is not None and stat.S_ISREG(mode)


def is_fifo(spec: str) -> bool:
    """A named FIFO (mkfifo); not stdin, even when stdin is a pipe (that one ends for good)."""
    mode = None if spec == "-" else _mode(spec)
    return mode is not None and stat.S_ISFIFO(mode)


def excerpt(text: str, n: int = 40) -> str:
    """The start of a question, quoted, to say which one a warning is about."""
    t = " ".join(text.split())
    return repr(t if len(t) <= n else t[: n - 1] + "\u2026")


class Questions:
    """The questions of --questions, asked while narration runs. stop() (the narration is
    over) waits for a question being asked: each one asked before it is answered by
    answer_now(), and after it nothing is asked or reported, so no question falls unseen
    between the last frame and the end, and no event follows the transcript's close."""

    def __init__(self, spec: str, assistant, emit: Callable[[Event], None]):
        self.spec = spec
        self.assistant = assistant
        self.emit = emit  # hands an event out (printed, written to the transcript)
        self._lock = threading.Lock()
        self._running = True

    @property
    def running(self) -> bool:
        return self._running and not self.assistant.closed

    def stop(self) -> None:
        with self._lock:
            running, self._running = self._running, False
        if running and is_fifo(self.spec):
            wake_fifo(self.spec)  # its reader, blocked on it, ends now

    def ask(self, line: str) -> bool:
        """Ask one line (a blank one is skipped); a refused question becomes a warning event.
        False once stopped."""
        with self._lock:
            if not self.running:
                return False
            if not line.strip():
                return True
            try:
                self.assistant.ask(line)
            except OnsightError as e:
                if self.assistant.closed:
                    return False
                self.emit(self.assistant.warn(f"question not asked ({excerpt(line)}): {e}"))
            return True

    def warn(self, message: str) -> bool:
        """`message` as a warning event; False (and no event) once stopped."""
        with self._lock:
            if not self.running:
                return False
            self.emit(self.assistant.warn(message))
            return True


def wake_fifo(path: str) -> None:
    """Write an empty line to a FIFO, so a reader blocked on it reads again (and sees that
    narration ended); a FIFO without a reader, or full, is left as it is."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails at once without a reader
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)


def bounded_lines(stream, limit: int = MAX_LINE_CHARS):
    """The lines of `stream` as they arrive; a line of over `limit` characters comes back as
    None (read through and dropped, never held whole)."""
    while line := stream.readline(limit):
        if len(line) < limit or line.endswith("\n"):
            yield line
            continue
        while line and not line.endswith("\n"):
            line = stream.readline(limit)
        yield None


def ask_lines(stream, questions: Questions) -> None:
    """Ask each line of `stream` until it ends or `questions` stops."""
    too_long = (
        f"--questions {questions.spec}: skipped a line of over {MAX_LINE_CHARS} characters; "
        "give one question per line, in a text file"
    )
    for line in bounded_lines(stream):
        if not (questions.warn(too_long) if line is None else questions.ask(line)):
            return


def open_questions(spec: str):
    """`spec` (`-`: stdin) as UTF-8 text: bytes that are not UTF-8 read as U+FFFD instead of
    ending the reading. A FIFO is opened read-write where the OS allows it (Linux, macOS): the
    open does not wait for a writer, and a writer closing is no end of file, so `echo q > FIFO`
    can be run again and again. Without write permission it is opened read-only, which waits
    for a writer and ends when the last one closes (read_questions then reopens it)."""
    if spec == "-":
        return open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)
    if is_fifo(spec):
        try:
            fd = os.open(spec, os.O_RDWR)
        except OSError:
            fd = os.open(spec, os.O_RDONLY)
        return open(fd, encoding="utf-8", errors="replace")
    return open(spec, encoding="utf-8", errors="replace")  # noqa: SIM115


def read_questions(questions: Questions) -> None:
    """Ask every line of --questions as it arrives, until it ends or the narration does; a
    question the assistant refuses (too long for the bundle's KV cache, say) becomes a
    warning event, not an exit. A FIFO is read until the narration ends (reopened at an end
    of file, so a second writer's questions are asked too)."""
    spec = questions.spec
    while questions.running:
        try:
            stream = open_questions(spec)
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            questions.warn(f"--questions {spec}: cannot read it ({why}); no questions from it")
            return
        try:
            with stream:
                ask_lines(stream, questions)
        except (OSError, ValueError) as e:  # the stream was closed under us
            log.debug("question stream ended: %s", e)
            return
        if not is_fifo(spec):
            return


def start_questions(spec: str, assistant, emit: Callable[[Event], None]) -> Questions:
    """Ask the questions of `spec`: a regular file (also stdin redirected from one) whole,
    now, before the first frame; anything else (a terminal, a pipe, a FIFO) as lines arrive,
    on a thread of its own, since reading it waits for its writer and narration must not."""
    questions = Questions(spec, assistant, emit)
    if is_regular_file(spec):
        read_questions(questions)
    else:
        threading.Thread(
            target=read_questions,
            args=(questions,),
            name="onsight-questions",
            daemon=True,  # a reader blocked on stdin or a FIFO must not keep the process alive
        ).start()
    return questions


def check_questions(spec: str) -> None:
    """Refuse up front a --questions path that cannot be read (`-` is stdin)."""
    if spec == "-":
        if sys.stdin is None:
            raise OnsightError(
                "--questions -: stdin is closed; run it with stdin open, or give a file or a "
                "FIFO another process writes (mkfifo)"
            )
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


__all__ = [
    "MAX_LINE_CHARS",
    "Questions",
    "ask_lines",
    "bounded_lines",
    "check_questions",
    "is_fifo",
    "is_regular_file",
    "open_questions",
    "read_questions",
    "start_questions",
    "wake_fifo",
]
