"""The `onsight run` terminal app: live narration, preview, stats and questions.

Threads: one worker owns the engine and iterates `engine.narrate(source)` (narration_run.py;
the model runs there, never on the event loop); it posts typed messages (messages.py) that
the handlers below turn into widget updates. The preview polls the tapped source's newest
frame on a timer, so capture never waits for the UI. Pausing closes a gate that both the tap
and the worker wait on, so no frame is consumed and no line is produced while paused.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from pathlib import Path

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.widgets import Footer, Input

from onsight.runtime.errors import OnsightError
from onsight.runtime.frames import Frame
from onsight.runtime.transcript import Transcript

from .engine import GATE_POLL_S, Engine, EngineFactory, SourceOpener, question_budget
from .error_screen import ErrorScreen
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
    Terminated,
    Warned,
    message_for,
)
from .narration_log import NarrationLog
from .narration_run import NarrationRun
from .preview import Preview
from .question import QuestionInput
from .recorder import Recorder
from .signals import HANGUP_CODE, ExitOnSignals
from .stats_panel import StatsPanel

log = logging.getLogger(__name__)

PREVIEW_HZ = 8.0  # how often the preview looks for a newer frame
NARROW_BELOW = 72  # columns: narrower, the side panel leaves the log the whole width (v shows it)
SHORT_BELOW = 22  # rows: shorter, the stats panel hides (a one-line summary stays on the log)
TYPE_TO_ASK = [c for c in string.ascii_letters + string.digits if c not in "pvsq"]  # not keys


class OnsightApp(App[None]):
    """Live narration of one source by one engine."""

    CSS_PATH = "onsight.tcss"
    TITLE = "onsight"
    ENABLE_COMMAND_PALETTE = False  # keeps ctrl+p free and the footer uncluttered
    # Breakpoint classes on the screen; onsight.tcss lays out small terminals with them.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW_BELOW, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (SHORT_BELOW, "-tall")]
    BINDINGS = [
        # One key, two bindings: check_action shows the one that applies in the footer.
        Binding("p", "pause(True)", "Pause"),
        Binding("p", "pause(False)", "Resume"),
        Binding("v", "toggle_preview", "Preview"),
        Binding("s", "save_snapshot", "Snapshot"),
        # priority: handled as the key arrives, so keys typed right after it already go to
        # the question box (a non-priority binding runs only after the key has bubbled up).
        Binding("slash,question_mark", "ask", "Ask", key_display="/", priority=True),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        # Over SSH Ctrl-C means stop: quit cleanly (Textual's default only says "use ctrl+q"),
        # unless there is selected text to copy.
        Binding("ctrl+c", "interrupt", "Quit", show=False, priority=True),
        # Typing on the log starts a question (after one is sent, focus is back on the log
        # and the next is typed straight away). Priority, like "/": the focus moves before
        # the rest of "what is it", which a terminal sends in one read, is handed out.
        *(Binding(c, f"type_to_ask('{c}')", show=False, priority=True) for c in TYPE_TO_ASK),
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
        handle_signals: bool = False,
    ) -> None:
        """engine_factory builds the engine (slow: loads the bundle) in the worker thread;
        open_source opens `source` at the engine's fps, also in the worker. demo_video
        returns the demo clip's path (rendering it once); None disables the offer.
        handle_signals: SIGTERM and SIGHUP quit like q (engine, source and transcript
        closed, the terminal restored) instead of killing the process mid-screen, and so
        does a terminal that hangs up without sending SIGHUP."""
        super().__init__()
        self._spec = source
        self._recorder = Recorder(transcript)
        self._show_preview = show_preview
        self._save_dir = Path(save_dir)
        # Engine, source and the gates the workers wait on; run.release() closes them.
        self._run = NarrationRun(
            engine_factory,
            open_source,
            self._recorder,
            self.post_message,
            fps=fps,
            demo_video=demo_video,
            use_demo=use_demo,
        )
        self._signals = (
            ExitOnSignals(self._run.release, lambda code: self.post_message(Terminated(code)))
            if handle_signals
            else None
        )

        # UI-thread state.
        self._preview: Preview | None = None  # set on mount; the preview timer uses it
        self.paused = False
        self.stream_time: float | None = None  # newest frame timestamp seen in an event
        self.narration_done = False  # set when the narrate worker has exited
        self._source_ended = False  # the source said "ended" (a file played to its end)
        self.last_saved: tuple[Path | None, Path] | None = None
        self._quitting = False
        self._exit_code = 0

    # ------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield NarrationLog(id="log")
                yield QuestionInput(id="question")
            with Vertical(id="side"):
                yield Preview(id="preview")
                yield StatsPanel(id="stats")
        yield Footer()

    def on_mount(self) -> None:
        log_widget = self.query_one(NarrationLog)
        log_widget.border_title = "narration"
        self._preview = preview = self.query_one(Preview)
        preview.border_title = "preview"
        # Shown or hidden by classes on #main, never inline: the layout's breakpoints
        # (onsight.tcss) must still apply.
        self.query_one("#main").set_class(not self._show_preview, "-hide-preview")
        self.query_one(StatsPanel).border_title = "stats"
        if self._signals is not None:
            self._signals.install(watch_terminal=not self.is_headless)
        question = self.query_one("#question", Input)
        question.cursor_blink = False  # deterministic screenshots; calmer over SSH
        log_widget.focus()  # so single-key bindings work until the user asks something
        self.set_interval(1 / PREVIEW_HZ, self._refresh_preview)
        self._start()

    # ------------------------------------------------------------------------------ worker

    def _start(self) -> None:
        if not self._run.begin():
            return  # quitting
        self.narration_done = self._source_ended = False
        self._narrate()

    @work(thread=True, exclusive=True, exit_on_error=False, group="narrate")
    def _narrate(self) -> None:
        self._run.narrate(self._spec)

    # ------------------------------------------------------------------------------ messages

    @on(Status)
    def _on_status(self, message: Status) -> None:
        self.query_one(NarrationLog).add_note(self.stream_time, message.text)

    @on(EngineLoaded)
    def _on_engine_loaded(self, message: EngineLoaded) -> None:
        self.query_one(StatsPanel).set_engine(message.info)
        engine = self._run.engine
        budget = question_budget(engine) if engine is not None else None
        if budget is not None:
            self.query_one(QuestionInput).set_budget(*budget)

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
        self._source_ended = self._source_ended or ev.status == "ended"
        # In-stream: the model's place in the stream (the tap runs a few frames ahead), but
        # after "ended" every frame has been seen.
        stamp = self._now() if ev.status == "ended" else self.stream_time
        self.query_one(NarrationLog).add_source(stamp, ev)
        stats = self.query_one(StatsPanel)
        stats.set_source(stats.source, ev.status)
        if ev.status == "failed":  # a live source gave up reconnecting
            self._show_error("source", ev.message or "the source failed", 3, False)

    @on(StatsUpdated)
    def _on_stats(self, message: StatsUpdated) -> None:
        self.query_one(StatsPanel).set_stats(message.event)
        self._show_summary()

    @on(Warned)
    def _on_warned(self, message: Warned) -> None:
        self.query_one(NarrationLog).add_warning(self.stream_time, message.text)

    @on(NarrationStopped)
    def _on_stopped(self, _: NarrationStopped) -> None:
        self.narration_done = True
        self.query_one(StatsPanel).clear_rates()
        self.refresh_bindings()  # nothing left to pause
        if self._source_ended and not self._quitting:
            self.query_one(NarrationLog).add_note(
                self._now(), "/ asks about what was seen, q quits"
            )

    @on(NarrationFailed)
    def _on_failed(self, message: NarrationFailed) -> None:
        self._show_error(message.stage, message.text, message.exit_code, message.offer_demo)

    @on(SnapshotSaved)
    def _on_snapshot_saved(self, message: SnapshotSaved) -> None:
        self.last_saved = (message.image, message.transcript)
        saved = [p for p in (message.image, message.transcript) if p is not None]
        where = saved[0].resolve().parent if saved else None
        names = ", ".join(p.name for p in saved)
        self.query_one(NarrationLog).add_note(self._now(), f"saved {names} in {where}")

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
        stats = self.query_one(StatsPanel)
        if stage == "bundle":
            stats.set_engine_failed()
        elif stage == "source":
            stats.set_source(stats.source, "failed")
        self.query_one(NarrationLog).add_warning(self._now(), f"{title}: {text}")
        self._exit_code = code

        def chosen(choice: str | None) -> None:
            if choice == "demo":
                self._run.use_demo = True
            if choice in ("retry", "demo"):
                self._exit_code = 0
                self._retry_when_idle()
            else:
                self._begin_shutdown()

        self.push_screen(ErrorScreen(title, text, offer_demo), chosen)

    def _retry_when_idle(self) -> None:
        # A "failed" source event arrives while the worker is still winding down.
        if self._run.idle.is_set():
            self._start()
        else:
            self.set_timer(GATE_POLL_S, self._retry_when_idle)

    # ------------------------------------------------------------------------------ preview

    def _refresh_preview(self) -> None:
        tap = self._run.tap
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

    def action_pause(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self._run.flowing.clear()
        else:
            self._run.flowing.set()
        self.query_one(StatsPanel).set_paused(paused)
        self.query_one(NarrationLog).add_note(self._now(), "paused" if paused else "resumed")
        self._show_summary()
        self.refresh_bindings()  # the footer swaps Pause and Resume

    def action_toggle_preview(self) -> None:
        main = self.query_one("#main")
        if self.screen.has_class("-narrow"):
            # No room beside the log: the preview and stats take its place, and back.
            main.toggle_class("-side-view")
            main.remove_class("-hide-preview")
        else:
            main.toggle_class("-hide-preview")
        self._refresh_preview()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("ask", "type_to_ask") and isinstance(self.screen, ErrorScreen):
            return False  # the box is on the screen beneath: typing there would be invisible
        if action == "ask" and isinstance(self.focused, Input):
            return False  # typing "/" or "?" in the question box types it
        if action == "type_to_ask":
            return isinstance(self.focused, NarrationLog)  # elsewhere the key is just the key
        if action == "pause":  # one of Pause / Resume shows, never both
            if parameters == (True,) and self.narration_done and not self.paused:
                return None  # shown dimmed: the stream is over, there is nothing to pause
            return self.paused != parameters[0]
        return True

    def action_ask(self) -> None:
        self.query_one("#main").remove_class("-side-view")  # the box is beside the log
        # set_focus now, not Widget.focus() (which defers): keys typed right after "/" are
        # already queued and must land in the box, not trigger p/s/q on the log.
        self.screen.set_focus(self.query_one(QuestionInput))

    def action_type_to_ask(self, char: str) -> None:
        self.action_ask()
        self.query_one(QuestionInput).insert_text_at_cursor(char)

    def action_leave_question(self) -> None:
        self.screen.set_focus(self.query_one(NarrationLog))  # so p/v/s/q work again

    @on(Input.Submitted, "#question")
    def _on_question(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            event.input.value = ""
            self.action_leave_question()  # "/" then Enter: nothing to ask, back to the log
            return
        engine = self._run.engine
        after_end = self.narration_done  # no frame will come: answer from what was seen
        if engine is None or (after_end and not hasattr(engine, "answer_now")):
            why = "not loaded yet" if engine is None and not after_end else "not narrating"
            self.notify(f"the engine is {why}; ask again once frames show", severity="warning")
            return
        log_widget = self.query_one(NarrationLog)
        try:
            engine.ask(question)  # a deque append: answered after the next processed frame
        except OnsightError as e:
            # One line in the log says why; the box keeps the text to shorten.
            log_widget.add_warning(self._now(), f"question not asked: {e}")
            return
        event.input.value = ""
        log_widget.add_question(self._now(), question)
        if (after_end or self.paused) and hasattr(engine, "answer_now"):
            self._answer_now(engine)  # from what the KV cache holds, without a new frame
        elif self.paused:
            log_widget.add_note(self._now(), "answered when you resume (p)")
        self.action_leave_question()

    @work(thread=True, exclusive=True, exit_on_error=False, group="answer")
    def _answer_now(self, engine: Engine) -> None:
        """Paused, or the source ended: the questions answered from the KV cache."""
        try:
            events = engine.answer_now()  # type: ignore[attr-defined]
        except OnsightError as e:
            self.post_message(Warned(f"could not answer: {e}"))
            return
        if not events:  # no frame processed yet: the question waits for the first one
            self.post_message(Status("nothing seen yet: answered after the next frame"))
        for event in events:
            self._recorder.record(event)
            self.post_message(message_for(event))

    def key_escape(self) -> None:
        self.query_one("#main").remove_class("-side-view")

    def action_interrupt(self) -> None:
        """Ctrl-C: copy the selection if there is one, else quit as q does."""
        focused = self.focused
        selected = focused.selected_text if isinstance(focused, Input) else None
        selected = selected or self.screen.get_selected_text()
        if selected:
            self.copy_to_clipboard(selected)
        else:
            self._begin_shutdown()

    @on(Terminated)
    def _on_terminated(self, message: Terminated) -> None:
        self._exit_code = message.exit_code
        self._begin_shutdown()

    def _now(self) -> float | None:
        """Stream time for what the user does (pause, save, ask): the frame they see, the
        newest in the preview or an event, not the last line said (silence can be long)."""
        tap = self._run.tap
        frame = tap.latest if tap is not None else None
        times = [t for t in (self.stream_time, frame and frame.timestamp) if t is not None]
        return max(times, default=None)

    def _show_summary(self, size: Size | None = None) -> None:
        """The stats panel's one-line summary on the log's border while the panel is hidden
        (a narrow or short terminal, as the breakpoints in the .tcss decide), after "paused"."""
        width, height = size or self.size
        narrow = width < NARROW_BELOW
        summary = self.query_one(StatsPanel).summary() if narrow or height < SHORT_BELOW else ""
        parts = (["paused"] if self.paused else []) + ([summary] if summary else [])
        self.query_one(NarrationLog).border_subtitle = " · ".join(parts)
        self.query_one(Preview).border_subtitle = " · ".join(parts)  # v's view, when narrow
        self.query_one(Footer).compact = narrow

    def on_resize(self, event: events.Resize) -> None:
        self._show_summary(event.size)

    def action_save_snapshot(self) -> None:
        tap = self._run.tap
        self._save(tap.latest if tap is not None else None)

    @work(thread=True, exclusive=True, exit_on_error=False, group="save")
    def _save(self, frame: Frame | None) -> None:
        try:
            image, text = self._recorder.save(self._save_dir, frame)
        except (OSError, OnsightError) as e:
            self.post_message(SnapshotFailed(f"{e}; check {self._save_dir} is writable"))
            return
        self.post_message(SnapshotSaved(image, text))

    async def action_quit(self) -> None:
        self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        self.query_one(NarrationLog).add_note(self._now(), "closing ...")
        self._close_down()

    @work(thread=True, exclusive=True, exit_on_error=False, group="shutdown")
    def _close_down(self) -> None:
        self._run.release()
        self.call_from_thread(self.exit, None, self._exit_code)

    def on_unmount(self) -> None:
        if self._signals is not None:
            self._signals.uninstall()
        self._run.release_in_background()  # an exit without the quit action: a test, a crash

    def exit_code(self) -> int:
        """What `onsight run` exits with, once run() has returned. Waits for a release that an
        exit without the quit action started (Textual's own exit on a dead terminal, a crash),
        so the camera and transcript are closed before the process ends; SIGHUP's code when
        the terminal hung up, however the app learnt of it."""
        self._run.release()  # idempotent: returns once released, by whichever thread
        if self._signals is not None and self._signals.hung_up:
            return HANGUP_CODE
        return int(self.return_code or 0)

    @property
    def transcript_lines(self) -> list[str]:
        """The events so far as JSON lines (what s saves)."""
        return self._recorder.lines
