"""The `onsight run` terminal app: live narration, preview, stats and questions.

Threads: one worker owns the engine and iterates `engine.narrate(source)` (the model runs
there, never on the event loop); it posts typed messages (messages.py) that the handlers
below turn into widget updates. The preview polls the tapped source's newest frame on a
timer, so capture never waits for the UI. Pausing closes a gate that both the tap and the
worker wait on, so no frame is consumed and no line is produced while paused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import cv2
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Static

from onsight.runtime.capture import SourceKind, classify_spec
from onsight.runtime.errors import OnsightError, SourceError
from onsight.runtime.events import (
    AnswerEvent,
    Event,
    NarrationEvent,
    SourceEvent,
    StatsEvent,
    WarningEvent,
)
from onsight.runtime.files import write_text_atomic
from onsight.runtime.frames import Frame
from onsight.runtime.transcript import Transcript

from .engine import GATE_POLL_S, Engine, EngineFactory, SourceOpener, TappedSource, describe_engine
from .messages import (
    Answered,
    EngineLoaded,
    Narrated,
    NarrationFailed,
    NarrationStopped,
    SnapshotFailed,
    SnapshotSaved,
    SourceChanged,
    SourceOpened,
    StatsUpdated,
    Status,
    Warned,
)
from .narration_log import NarrationLog
from .preview import Preview
from .stats_panel import StatsPanel

log = logging.getLogger(__name__)

PREVIEW_HZ = 8.0  # how often the preview looks for a newer frame
SHUTDOWN_TIMEOUT_S = 20.0  # longest wait for the narrate worker on quit (one slow frame)
TRANSCRIPT_STATS_EVERY = 10  # stats lines in the transcript: one per this many frames
MAX_KEPT_LINES = 200_000  # transcript lines kept in memory for the s key (~40 MB)


class ErrorScreen(ModalScreen[str]):
    """The source or the bundle failed: say why, offer retry (and the demo video), or quit.

    Dismisses with "retry", "demo" or "quit".
    """

    BINDINGS = [
        Binding("r", "choose('retry')", "Retry"),
        Binding("d", "choose('demo')", "Demo video", show=False),
        Binding("q,escape", "choose('quit')", "Quit"),
    ]

    def __init__(self, title: str, text: str, offer_demo: bool) -> None:
        super().__init__()
        self._title, self._text, self._offer_demo = title, text, offer_demo

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box") as box:
            box.border_title = self._title
            yield Static(self._text, id="error-text", markup=False)
            if self._offer_demo:
                yield Label("No camera here? Play the demo video instead.", id="error-hint")
            with Horizontal(id="error-buttons"):
                yield Button("Retry (r)", id="retry", variant="primary")
                if self._offer_demo:
                    yield Button("Demo video (d)", id="demo", variant="success")
                yield Button("Quit (q)", id="quit", variant="error")

    def action_choose(self, choice: str) -> None:
        if choice == "demo" and not self._offer_demo:
            return
        self.dismiss(choice)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id))


class OnsightApp(App[None]):
    """Live narration of one source by one engine."""

    CSS_PATH = "onsight.tcss"
    TITLE = "onsight"
    ENABLE_COMMAND_PALETTE = False  # keeps ctrl+p free and the footer uncluttered
    BINDINGS = [
        Binding("p", "toggle_pause", "Pause/Resume"),
        Binding("v", "toggle_preview", "Preview"),
        Binding("s", "save_snapshot", "Snapshot"),
        # priority: handled as the key arrives, so keys typed right after it already go to
        # the question box (a non-priority binding runs only after the key has bubbled up).
        Binding("slash,question_mark", "ask", "Ask", key_display="/", priority=True),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        engine_factory: EngineFactory,
        source: str,
        *,
        open_source: SourceOpener,
        fps: float | None = None,
        transcript: Transcript | None = None,
        show_preview: bool = True,
        save_dir: Path = Path("."),
        demo_video: Callable[[], Path] | None = None,
        use_demo: bool = False,
    ) -> None:
        """engine_factory builds the engine (slow: loads the bundle) in the worker thread;
        open_source opens `source` at the engine's fps, also in the worker. demo_video
        returns the demo clip's path (rendering it once); None disables the offer."""
        super().__init__()
        self._engine_factory = engine_factory
        self._open_source = open_source
        self._spec = source
        self._fps = fps
        self._transcript = transcript
        self._show_preview = show_preview
        self._save_dir = Path(save_dir)
        self._demo_video = demo_video
        self._use_demo = use_demo and demo_video is not None

        # Shared with worker threads; each is written by one side only or is an Event.
        self._engine: Engine | None = None
        self._tap: TappedSource | None = None
        self._flowing = threading.Event()  # clear while paused
        self._flowing.set()
        self._stop = threading.Event()  # quitting: workers wind down
        self._idle = threading.Event()  # no narrate worker is running
        self._idle.set()
        self._released = threading.Event()  # engine, source and transcript are closed
        self._release_lock = threading.Lock()
        # Every event as JSON, for "save transcript"; bounded for week-long runs (--transcript
        # keeps everything on disk).
        self._lines: deque[str] = deque(maxlen=MAX_KEPT_LINES)
        self._lines_lock = threading.Lock()  # the worker appends while a save copies
        self._stats_logged_at = -TRANSCRIPT_STATS_EVERY

        # UI-thread state.
        self._preview: Preview | None = None  # set on mount; the preview timer uses it
        self.paused = False
        self.stream_time: float | None = None  # newest frame timestamp seen in an event
        self.narration_done = False  # set when the narrate worker has exited
        self.last_saved: tuple[Path | None, Path] | None = None
        self._quitting = False
        self._exit_code = 0

    # ------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield NarrationLog(id="log")
                yield Input(
                    placeholder="/ to ask a question, Enter to send, Esc to leave", id="question"
                )
            with Vertical(id="side"):
                yield Preview(id="preview")
                yield StatsPanel(id="stats")
        yield Footer()

    def on_mount(self) -> None:
        log_widget = self.query_one(NarrationLog)
        log_widget.border_title = "narration"
        self._preview = preview = self.query_one(Preview)
        preview.border_title = "preview"
        preview.display = self._show_preview
        self.query_one(StatsPanel).border_title = "stats"
        question = self.query_one("#question", Input)
        question.cursor_blink = False  # deterministic screenshots; calmer over SSH
        log_widget.focus()  # so single-key bindings work until the user asks something
        self.set_interval(1 / PREVIEW_HZ, self._refresh_preview)
        self._start()

    # ------------------------------------------------------------------------------ worker

    def _start(self) -> None:
        if self._stop.is_set():
            return
        self.narration_done = False
        self._idle.clear()
        self._narrate()

    @work(thread=True, exclusive=True, exit_on_error=False, group="narrate")
    def _narrate(self) -> None:
        stage = "bundle"
        spec = self._spec
        try:
            engine = self._engine
            if engine is None:
                self.post_message(Status("loading engine ..."))
                engine = self._engine_factory()
                self._engine = engine  # before the stop check: quit closes it either way
                if self._stop.is_set():
                    return
                fps = self._fps or getattr(engine, "fps", None)
                self.post_message(EngineLoaded(describe_engine(engine, fps)))
            stage = "source"
            if self._use_demo and self._demo_video is not None:
                self.post_message(Status("preparing the demo video ..."))
                spec = str(self._demo_video())
            self.post_message(Status(f"opening {spec} ..."))
            fps = self._fps or getattr(engine, "fps", None)
            tap = TappedSource(self._open_source(spec, fps), self._flowing)
            self._tap = tap
            if self._stop.is_set():
                tap.close()
                return
            self.post_message(SourceOpened(spec))
            self._consume(engine, tap)
        except SourceError as e:
            self._fail("source", e, spec)
        except OnsightError as e:
            self._fail("engine" if stage == "source" else stage, e, spec)
        except Exception as e:  # a bug must reach the screen, not vanish with the thread
            log.exception("narration failed")
            self._fail("engine" if stage == "source" else stage, e, spec)
        finally:
            self._idle.set()
            self.post_message(NarrationStopped())

    def _consume(self, engine: Engine, tap: TappedSource) -> None:
        events = engine.narrate(tap)
        try:
            for event in events:
                # The LLM runs inside next(events); not calling it while paused stops the
                # model too, and an event that was already in flight waits here.
                while not self._flowing.wait(GATE_POLL_S):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._record(event)
                self.post_message(_message_for(event))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # runs narrate()'s finally: the pipeline and the source shut down

    def _record(self, event: Event) -> None:
        """Transcript and in-memory copy, in the worker (fsync is blocking I/O)."""
        if isinstance(event, StatsEvent):
            if event.frames_processed - self._stats_logged_at < TRANSCRIPT_STATS_EVERY:
                return
            self._stats_logged_at = event.frames_processed
        line = event.to_json()
        with self._lines_lock:
            self._lines.append(line)
        if self._transcript is not None:
            try:
                self._transcript.append(line)
            except (OSError, ValueError, OnsightError) as e:  # disk full, closed: narrate on
                log.warning("transcript write failed: %s", e)

    def _fail(self, stage: str, error: BaseException, spec: str) -> None:
        if self._stop.is_set():
            return  # errors while shutting down are expected (closed source, closed engine)
        text = str(error) or repr(error)
        code = error.exit_code if isinstance(error, OnsightError) else 1
        offer = stage == "source" and self._demo_video is not None and _is_camera(spec)
        self.post_message(NarrationFailed(stage, text, code, offer))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------ messages

    @on(Status)
    def _on_status(self, message: Status) -> None:
        self.query_one(NarrationLog).add_note(self.stream_time, message.text)

    @on(EngineLoaded)
    def _on_engine_loaded(self, message: EngineLoaded) -> None:
        self.query_one(StatsPanel).set_engine(message.info)

    @on(SourceOpened)
    def _on_source_opened(self, message: SourceOpened) -> None:
        self.query_one(StatsPanel).set_source(Path(message.name).name or message.name, "opening")

    @on(Narrated)
    def _on_narrated(self, message: Narrated) -> None:
        self.stream_time = message.event.frame_timestamp
        self.query_one(NarrationLog).add_narration(message.event)

    @on(Answered)
    def _on_answered(self, message: Answered) -> None:
        self.stream_time = message.event.frame_timestamp
        self.query_one(NarrationLog).add_answer(message.event)

    @on(SourceChanged)
    def _on_source_changed(self, message: SourceChanged) -> None:
        ev = message.event
        self.query_one(NarrationLog).add_source(self.stream_time, ev)
        stats = self.query_one(StatsPanel)
        stats.set_source(stats.source, ev.status)
        if ev.status == "failed":  # a live source gave up reconnecting
            self._show_error("source", ev.message or "the source failed", 3, False)

    @on(StatsUpdated)
    def _on_stats(self, message: StatsUpdated) -> None:
        self.query_one(StatsPanel).set_stats(message.event)

    @on(Warned)
    def _on_warned(self, message: Warned) -> None:
        self.query_one(NarrationLog).add_warning(self.stream_time, message.text)

    @on(NarrationStopped)
    def _on_stopped(self, _: NarrationStopped) -> None:
        self.narration_done = True

    @on(NarrationFailed)
    def _on_failed(self, message: NarrationFailed) -> None:
        self._show_error(message.stage, message.text, message.exit_code, message.offer_demo)

    @on(SnapshotSaved)
    def _on_snapshot_saved(self, message: SnapshotSaved) -> None:
        self.last_saved = (message.image, message.transcript)
        saved = [p for p in (message.image, message.transcript) if p is not None]
        where = saved[0].resolve().parent if saved else None
        names = ", ".join(p.name for p in saved)
        self.query_one(NarrationLog).add_note(self.stream_time, f"saved {names} in {where}")

    @on(SnapshotFailed)
    def _on_snapshot_failed(self, message: SnapshotFailed) -> None:
        self.notify(message.text, title="snapshot not saved", severity="error")

    def _show_error(self, stage: str, text: str, code: int, offer_demo: bool) -> None:
        if self._quitting or isinstance(self.screen, ErrorScreen):
            return  # e.g. a "failed" source event and then the worker's own error
        title = {
            "bundle": "cannot load the engine",
            "source": "cannot read the source",
        }.get(stage, "narration stopped")
        self.query_one(NarrationLog).add_warning(self.stream_time, f"{title}: {text}")
        self._exit_code = code

        def chosen(choice: str | None) -> None:
            if choice == "demo":
                self._use_demo = True
            if choice in ("retry", "demo"):
                self._exit_code = 0
                self._retry_when_idle()
            else:
                self._begin_shutdown()

        self.push_screen(ErrorScreen(title, text, offer_demo), chosen)

    def _retry_when_idle(self) -> None:
        # A "failed" source event arrives while the worker is still winding down.
        if self._idle.is_set():
            self._start()
        else:
            self.set_timer(GATE_POLL_S, self._retry_when_idle)

    # ------------------------------------------------------------------------------ preview

    def _refresh_preview(self) -> None:
        tap = self._tap
        frame = tap.latest if tap is not None else None
        preview = self._preview
        if (
            preview is not None
            and frame is not None
            and preview.display
            and frame.index != preview.frame_index
        ):
            preview.show(frame.image, frame.index)

    # ------------------------------------------------------------------------------ actions

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if self.paused:
            self._flowing.clear()
        else:
            self._flowing.set()
        self.query_one(StatsPanel).set_paused(self.paused)
        log_widget = self.query_one(NarrationLog)
        log_widget.border_subtitle = "paused" if self.paused else ""
        log_widget.add_note(self.stream_time, "paused" if self.paused else "resumed")

    def action_toggle_preview(self) -> None:
        preview = self.query_one(Preview)
        preview.display = not preview.display
        if preview.display:
            self._refresh_preview()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "ask" and isinstance(self.focused, Input):
            return False  # typing "/" or "?" in the question box types it
        return True

    def action_ask(self) -> None:
        # set_focus now, not Widget.focus() (which defers): keys typed right after "/" are
        # already queued and must land in the box, not trigger p/s/q on the log.
        self.screen.set_focus(self.query_one("#question", Input))

    @on(Input.Submitted, "#question")
    def _on_question(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            return
        engine = self._engine
        after_end = self.narration_done  # no frame will come: answer from what was seen
        if engine is None or (after_end and not hasattr(engine, "answer_now")):
            self.notify("the engine is not narrating; nothing to answer with", severity="warning")
            return
        log_widget = self.query_one(NarrationLog)
        try:
            engine.ask(question)  # a deque append: answered after the next processed frame
        except OnsightError as e:
            self.notify(str(e), severity="error")  # the box keeps the text to shorten
            log_widget.add_warning(self.stream_time, f"question not asked: {e}")
            return
        event.input.value = ""
        log_widget.add_question(self.stream_time, question)
        if after_end:
            threading.Thread(target=self._answer_now, args=(engine,), daemon=True).start()
        elif self.paused:
            log_widget.add_note(self.stream_time, "answered when you resume (p)")
        self.screen.set_focus(log_widget)  # back to the log so p/v/s/q work again

    def _answer_now(self, engine: Engine) -> None:
        """After the source ended: the questions answered from the KV cache (a thread)."""
        try:
            events = engine.answer_now()  # type: ignore[attr-defined]
        except OnsightError as e:
            self.post_message(Warned(f"could not answer: {e}"))
            return
        for event in events:
            self._record(event)
            self.post_message(_message_for(event))

    def key_escape(self) -> None:
        if isinstance(self.focused, Input):
            self.query_one(NarrationLog).focus()

    def action_save_snapshot(self) -> None:
        tap = self._tap
        self._save(tap.latest if tap is not None else None)

    @work(thread=True, exclusive=True, exit_on_error=False, group="save")
    def _save(self, frame: Frame | None) -> None:
        stem = time.strftime("onsight-%Y%m%d-%H%M%S")
        try:
            self._save_dir.mkdir(parents=True, exist_ok=True)
            image_path: Path | None = None
            if frame is not None:
                image_path = self._save_dir / f"{stem}.png"
                bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)  # imwrite expects BGR
                if not cv2.imwrite(str(image_path), bgr):
                    raise OSError(f"OpenCV could not write {image_path}")
            text_path = self._save_dir / f"{stem}.jsonl"
            lines = self.transcript_lines
            write_text_atomic(text_path, "".join(line + "\n" for line in lines))
        except (OSError, OnsightError) as e:
            self.post_message(SnapshotFailed(f"{e}; check {self._save_dir} is writable"))
            return
        self.post_message(SnapshotSaved(image_path, text_path))

    async def action_quit(self) -> None:
        self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        self.query_one(NarrationLog).add_note(self.stream_time, "closing ...")
        self._close_down()

    @work(thread=True, exclusive=True, exit_on_error=False, group="shutdown")
    def _close_down(self) -> None:
        self._release()
        self.call_from_thread(self.exit, None, self._exit_code)

    def _release(self) -> None:
        """Stop the worker, then close source, engine and transcript (idempotent, any thread)."""
        self._stop.set()
        self._flowing.set()  # a paused worker must see the stop
        tap = self._tap
        if tap is not None:
            tap.close()  # ends a source blocked waiting for frames
        if not self._idle.wait(SHUTDOWN_TIMEOUT_S):
            log.warning("narration did not stop within %.0f s; closing anyway", SHUTDOWN_TIMEOUT_S)
        with self._release_lock:
            if self._released.is_set():
                return
            engine, self._engine = self._engine, None
            if engine is not None:
                try:
                    engine.close()
                except Exception:
                    log.exception("closing the engine failed")
            if self._transcript is not None:
                self._transcript.close()
            self._released.set()

    def on_unmount(self) -> None:
        # Exit without the quit action (a test harness, a crash): release in the background
        # so the event loop is not held up by a camera's close.
        if not self._released.is_set():
            threading.Thread(target=self._release, name="onsight release", daemon=True).start()

    @property
    def transcript_lines(self) -> list[str]:
        """The events so far as JSON lines (what s saves)."""
        with self._lines_lock:
            return list(self._lines)


def _message_for(event: Event):
    if isinstance(event, NarrationEvent):
        return Narrated(event)
    if isinstance(event, AnswerEvent):
        return Answered(event)
    if isinstance(event, SourceEvent):
        return SourceChanged(event)
    if isinstance(event, StatsEvent):
        return StatsUpdated(event)
    if isinstance(event, WarningEvent):
        return Warned(event.message)
    return Warned(f"unknown event {event.kind}")


def _is_camera(spec: str) -> bool:
    try:
        return classify_spec(spec)[0] is SourceKind.CAMERA
    except SourceError:
        return False
