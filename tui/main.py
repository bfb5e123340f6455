"""`onsight run`: flags, logging away from the terminal, and the production engine wiring."""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TextIO

from onsight.runtime.cli import POSITIVE, POSITIVE_INT, SOURCE_HELP
from onsight.runtime.errors import OnsightError

log = logging.getLogger(__name__)

DUMB_TERMS = ("dumb", "unknown")


def terminal_problem(term: str, stdout: TextIO | None) -> str | None:
    """Why this terminal cannot show the app, or None. A terminal without cursor addressing
    (TERM=dumb: Emacs' M-x shell, a serial console) or an output encoding that is not UTF-8
    (LANG=C with PYTHONUTF8=0, a Latin-1 locale) draws garbage: say so instead, and how."""
    if term in DUMB_TERMS:
        return (
            f"onsight run needs a terminal that can draw a full screen (TERM={term!r} cannot);"
            " set TERM=xterm-256color if yours can, or use `onsight narrate --source ...`"
        )
    encoding = getattr(stdout, "encoding", None) or "utf-8"
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        utf8 = False
    if not utf8:
        return (
            f"onsight run draws with Unicode but the terminal's encoding is {encoding}; run it "
            "with LANG=C.UTF-8 (or PYTHONUTF8=1), or use `onsight narrate --source ...`"
        )
    return None


def ensure_demo_video() -> Path:
    """The synthetic demo clip (the no-camera fallback and --demo): the same cached video
    that `onsight narrate --source demo` plays."""
    from onsight.runtime.synthetic.cli import demo_video_path

    return demo_video_path()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onsight run",
        description="Live narration of a camera or video in the terminal (works over SSH).",
    )
    p.add_argument(
        "--engine", default="engines/demo", help="bundle directory (default: the shipped demo)"
    )
    p.add_argument(
        "--source",
        default="0",
        help=SOURCE_HELP,
    )
    p.add_argument(
        "--fps", type=POSITIVE, default=None, help="sampling rate (default: the bundle's)"
    )
    p.add_argument(
        "--backend", default="auto", help="auto | onnxruntime | onnxruntime:cpu | tensorrt"
    )
    p.add_argument("--transcript", help="append every event as a JSON line here, as it happens")
    p.add_argument("--no-preview", action="store_true", help="start with the preview hidden")
    p.add_argument(
        "--demo", action="store_true", help="narrate the synthetic demo video instead of --source"
    )
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None, help="cap on one narration")
    p.add_argument("--save-dir", default=".", help="where s saves snapshot PNGs and transcripts")
    p.add_argument(
        "--log-file",
        default=None,
        help="log file while the app runs (default: ~/.cache/onsight/run.log)",
    )
    return p


class _AppLogHandler(logging.Handler):
    """Runtime warnings as quiet lines in the log instead of stray text over the screen."""

    def __init__(self, app) -> None:
        super().__init__(logging.WARNING)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        from .messages import Warned

        if not record.name.startswith("onsight") or not self.app.is_running:
            return
        try:
            self.app.post_message(Warned(record.getMessage()))  # thread-safe
        except Exception:  # logging must never raise into the runtime's threads
            self.handleError(record)


@contextmanager
def _logging_for_tui(app, log_file: Path) -> Iterator[None]:
    """While the app owns the terminal, nothing may write to it behind Textual's back:
    stderr handlers are swapped for a file and the app's log, and OpenCV is silenced."""
    root = logging.getLogger()
    terminal = [
        h
        for h in root.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for h in terminal:
        root.removeHandler(h)
    added: list[logging.Handler] = [_AppLogHandler(app)]
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        added.append(fh)
    except OSError as e:
        log.debug("no log file %s: %s", log_file, e)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)  # the file gets INFO; the app handler filters WARNING
    for h in added:
        root.addHandler(h)
    cv2_level = _silence_opencv()
    try:
        yield
    finally:
        for h in added:
            root.removeHandler(h)
            h.close()
        for h in terminal:
            root.addHandler(h)
        _restore_opencv(cv2_level)


def _silence_opencv() -> int | None:
    try:
        import cv2

        old = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        return old
    except (ImportError, AttributeError):
        return None


def _restore_opencv(level: int | None) -> None:
    if level is None:
        return
    import cv2

    cv2.utils.logging.setLogLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["--"]:  # `onsight run -- --engine X`: argparse's REMAINDER keeps the "--"
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if not sys.stdout.isatty() and not sys.stderr.isatty():
        raise OnsightError(
            "onsight run needs a terminal; for pipes and scripts use `onsight narrate`"
        )
    problem = terminal_problem(os.environ.get("TERM", ""), sys.__stdout__)
    if problem:
        raise OnsightError(problem)
    from onsight.runtime.assistant import Assistant, AssistantConfig
    from onsight.runtime.capture import open_source
    from onsight.runtime.files import cache_dir
    from onsight.runtime.synthetic.cli import resolve_source
    from onsight.runtime.transcript import Transcript

    from .app import OnsightApp

    config = AssistantConfig(
        backend=args.backend,
        fps=args.fps,
        realtime=True,  # a live view: files play at their own speed, like a camera
        max_new_tokens=args.max_new_tokens,
        stats_every=1,  # the stats panel updates every frame
    )
    transcript = Transcript(args.transcript) if args.transcript else None  # bad path: exit 2
    app = OnsightApp(
        partial(Assistant, args.engine, config),
        args.source,
        open_source=lambda spec, fps: open_source(resolve_source(spec), fps=fps, realtime=True),
        fps=args.fps,
        transcript=transcript,
        show_preview=not args.no_preview,
        save_dir=Path(args.save_dir),
        demo_video=ensure_demo_video,
        use_demo=args.demo,
        handle_signals=True,  # kill / a dropped SSH session: close down and restore the tty
    )
    # Textual sizes the screen with shutil.get_terminal_size(), which trusts COLUMNS/LINES
    # over the terminal: a shell that exported them would pin the layout and the preview to
    # that size and ignore every resize.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    log_file = Path(args.log_file) if args.log_file else cache_dir() / "run.log"
    try:
        with _logging_for_tui(app, log_file):
            app.run()
        return app.exit_code()
    finally:
        if transcript is not None:
            transcript.close()  # the app closes it on quit; this covers a crash


if __name__ == "__main__":
    sys.exit(main())
