"""`onsight run` as a demanding user drives it: small and resized terminals, NO_COLOR,
Ctrl-C and signals, the question box's edges (empty, too long, while paused, after the end),
and what the footer and panels say. Pilot tests with the fakes of test_tui.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import sys
import threading
import time

import pytest
from rich.console import Console
from test_tui import FakeEngine, ScriptedSource, log_of, make_app, press_text, run_async, wait_for
from textual import events

from onsight.runtime.errors import OnsightError, SourceError
from onsight.runtime.events import NarrationEvent
from onsight.runtime.transcript import Transcript
from onsight.tui.app import OnsightApp
from onsight.tui.error_screen import ErrorScreen
from onsight.tui.preview import Preview
from onsight.tui.question import QuestionInput
from onsight.tui.signals import ExitOnSignals
from onsight.tui.stats_panel import StatsPanel


def shown(app: OnsightApp, selector: str) -> bool:
    return app.query_one(selector).display


def footer_keys(app: OnsightApp) -> dict[str, tuple[str, bool]]:
    """What the footer offers now: key -> (description, enabled)."""
    return {
        key: (b.binding.description, b.enabled)
        for key, b in app.screen.active_bindings.items()
        if b.binding.show
    }


class BudgetEngine(FakeEngine):
    """A fake with the Assistant's question budget: a token per word, at most 5."""

    budget = 5

    def __init__(self) -> None:
        super().__init__()
        self.tokens = type("Tokens", (), {"encode": staticmethod(str.split)})()

    def max_question_tokens(self) -> int:
        return self.budget

    def ask(self, question: str) -> None:
        n = len(question.split())
        if n > self.budget:
            raise OnsightError(f"the question is {n} tokens; at most {self.budget}")
        super().ask(question)


# ------------------------------------------------------------------------------ terminals


@run_async
async def test_no_color_renders_the_preview(monkeypatch):
    """NO_COLOR=1 turns on Textual's monochrome filter, which needs a style on every
    segment: the preview's padding had none and the app died with a traceback."""
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(count=3, period=0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.query_one(Preview).frame_index == 2)
        await pilot.pause(0.1)
        assert "▀" in app.export_screenshot()
        await pilot.press("q")


@pytest.mark.parametrize("size", [(60, 20), (40, 15)], ids=["60x20", "40x15"])
@run_async
async def test_a_narrow_terminal_gives_the_log_the_width_and_v_shows_the_preview(size):
    """At 40x15 the side panel (min 36 columns) left the log 2 columns; now it hides, its
    summary sits on the log's border, and v swaps the log for preview and stats."""
    app = make_app(tickets=threading.Semaphore(5))
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) == 5)
        await wait_for(pilot, lambda: "frames/s" in str(log_of(app).border_subtitle))
        assert not shown(app, "#side")
        assert log_of(app).outer_size.width == size[0]
        assert "kv " in str(log_of(app).border_subtitle)
        await pilot.press("v")
        await pilot.pause(0.1)
        assert shown(app, "#side") and not shown(app, "#left")
        assert app.query_one(Preview).outer_size.width == size[0]
        await pilot.press("v")
        await pilot.pause(0.1)
        assert shown(app, "#left") and not shown(app, "#side")
        await pilot.press("q")


@run_async
async def test_a_short_terminal_keeps_the_preview_and_summarises_stats():
    app = make_app(tickets=threading.Semaphore(5))
    async with app.run_test(size=(100, 18)) as pilot:
        await wait_for(pilot, lambda: "kv " in str(log_of(app).border_subtitle))
        assert shown(app, "#side") and shown(app, "#preview")
        assert not shown(app, "#stats")
        await pilot.resize_terminal(100, 30)
        await pilot.pause(0.2)
        assert shown(app, "#stats")
        assert "kv" not in str(log_of(app).border_subtitle)  # the panel says it now
        await pilot.press("q")


@run_async
async def test_the_log_rewraps_after_a_resize():
    """RichLog keeps rows at the width they were written: shrinking cropped them (text
    lost), growing left them wrapped narrow."""
    long = "the green triangle enters from the left and stops next to the red star"
    app = make_app(count=0)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        log_of(app).add_narration(NarrationEvent(long, 0, 1.0))
        await pilot.pause(0.1)
        assert [s.text.strip() for s in log_of(app).lines][-1] == f"00:01.0  {long}"
        await pilot.resize_terminal(50, 30)
        await pilot.pause(0.5)
        rows = [s.text.rstrip() for s in log_of(app).lines]
        tail = rows[rows.index(next(r for r in rows if "00:01.0  the green" in r)) :]
        assert len(tail) > 1 and max(len(r) for r in tail) <= 46
        assert " ".join(r.strip() for r in tail).split() == ["00:01.0", *long.split()]
        await pilot.resize_terminal(160, 45)
        await pilot.pause(0.5)
        assert [s.text.strip() for s in log_of(app).lines][-1] == f"00:01.0  {long}"
        await pilot.press("q")


@run_async
async def test_a_scrollbar_appearing_hides_no_text():
    """Rows are drawn once at the log's width; when a long line made the log overflow, the
    scrollbar took a column and every full-width row lost its last character."""
    app = make_app(count=1, period=0.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        log = log_of(app)
        assert not log.show_vertical_scrollbar
        log.add_warning(1.0, "the question is 92 tokens; ask a shorter question " * 6)
        await pilot.pause(0.1)
        assert log.show_vertical_scrollbar
        width = log.scrollable_content_region.width
        assert max(strip.cell_length for strip in log.lines) <= width
        await pilot.press("q")


# ------------------------------------------------------------------------------ quitting


@run_async
async def test_ctrl_c_mid_stream_quits_cleanly(tmp_path):
    """Textual's Ctrl-C only says "press ctrl+q"; over SSH it must stop the app as q does."""
    engine = FakeEngine()
    path = tmp_path / "run.jsonl"
    app = make_app(engine=engine, transcript=Transcript(path))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) >= 3)
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 0 and engine.closed
    kinds = [json.loads(line)["type"] for line in path.read_text().splitlines()]
    assert kinds.count("narration") >= 3


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@run_async
async def test_sigterm_closes_down_like_q(tmp_path):
    """SIGTERM (and SIGHUP, a dropped SSH session) killed the app mid-screen: the terminal
    stayed raw in the alternate screen. Now engine, source and transcript close and the app
    exits 128 + signal; if its loop were stuck on a dead terminal, a hard exit follows."""
    engine = FakeEngine()
    path = tmp_path / "run.jsonl"
    hard_exits: list[int] = []
    before = signal.getsignal(signal.SIGTERM)
    app = make_app(engine=engine, transcript=Transcript(path), handle_signals=True)
    app._signals.grace_s = 0.2
    app._signals.hard_exit = hard_exits.append
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) >= 2)
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 128 + signal.SIGTERM and engine.closed
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored on exit
    deadline = time.monotonic() + 5
    while not hard_exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hard_exits == [128 + signal.SIGTERM]  # the fallback (the test process lives on)


def test_a_signal_releases_even_when_the_app_never_answers():
    released, codes = threading.Event(), []
    guard = ExitOnSignals(released.set, lambda code: None, grace_s=0.05, hard_exit=codes.append)
    guard._handler(signal.SIGHUP, None)
    guard._handler(signal.SIGHUP, None)  # a second signal starts nothing more
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert released.is_set() and codes == [128 + signal.SIGHUP]


def test_run_refuses_a_dumb_terminal(monkeypatch):
    from onsight.tui import main as run_main

    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    with pytest.raises(OnsightError, match="TERM='dumb'.*onsight narrate"):
        run_main.main(["--demo"])


def test_run_refuses_a_terminal_that_cannot_encode_its_drawing():
    """LC_ALL=C with PYTHONUTF8=0 gives an ASCII stdout: every border became "\\u2502"."""
    from onsight.tui.main import terminal_problem

    def stream(encoding: str) -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(), encoding=encoding)

    assert "LANG=C.UTF-8" in str(terminal_problem("xterm-256color", stream("ascii")))
    assert "latin-1" in str(terminal_problem("screen", stream("latin-1")))
    assert terminal_problem("xterm-256color", stream("UTF8")) is None
    assert terminal_problem("vt100", None) is None  # no stream to judge: let Textual try


# ------------------------------------------------------------------------------ questions


@run_async
async def test_an_empty_question_goes_back_to_the_log():
    app = make_app(tickets=threading.Semaphore(1))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: log_of(app).plain("narration"))
        await pilot.press("slash", "space", "enter")
        assert app.focused is log_of(app) and not log_of(app).plain("question")
        await pilot.press("q")  # q quits again, not typed into the box
        await wait_for(pilot, lambda: app.return_code is not None)


@run_async
async def test_the_question_box_counts_tokens_and_a_long_question_is_refused_once():
    app = make_app(engine=BudgetEngine(), tickets=threading.Semaphore(1))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: log_of(app).plain("narration"))
        box = app.query_one(QuestionInput)
        await pilot.press("slash")
        assert footer_keys(app)["enter"][0] == "Send" and "escape" in footer_keys(app)
        await press_text(pilot, "what is")
        assert box.border_subtitle == "2/5 tokens"
        await press_text(pilot, " on the left side")
        assert box.border_subtitle == "6/5 tokens: too long" and box.has_class("-too-long")
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert log_of(app).plain("warning") == [
            "! question not asked: the question is 6 tokens; at most 5"
        ]
        assert not app._notifications  # said once, in the log, not again in a toast
        assert box.value == "what is on the left side" and app.focused is box
        await pilot.press("escape")
        assert app.focused is log_of(app)
        await pilot.press("q")


@run_async
async def test_a_question_while_paused_is_answered_at_once():
    app = make_app(period=0.02)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) >= 3)
        assert footer_keys(app)["p"][0] == "Pause"
        await pilot.press("p")
        assert footer_keys(app)["p"][0] == "Resume"
        await pilot.press("slash")
        await press_text(pilot, "what now")
        await pilot.press("enter")
        await wait_for(pilot, lambda: log_of(app).plain("answer"))
        assert log_of(app).plain("answer") == ["onsight › from memory (what now)"]
        await pilot.press("q")


@run_async
async def test_notes_carry_the_time_of_the_frame_on_screen():
    """Notes used the last narration's time: a pause 30 s into a silent stretch read as the
    time of the last thing said."""
    app = make_app(tickets=threading.Semaphore(4))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.query_one(Preview).frame_index == 3)
        log_of(app).add_narration(NarrationEvent("", 3, 1.5))  # silence: nothing is written
        app.stream_time = 0.0  # as if the last line said was at the start
        await pilot.press("p")
        assert [e.stamp for e in log_of(app).entries if e.text == "· paused"] == ["00:01.5"]
        await pilot.press("q")


@run_async
async def test_after_the_end_the_log_says_what_next_and_pause_is_dimmed():
    app = make_app(count=2, period=0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        await pilot.pause(0.05)
        assert log_of(app).plain("note")[-1] == "· / asks about what was seen, q quits"
        assert footer_keys(app)["p"] == ("Pause", False)
        stats = app.query_one(StatsPanel)
        assert stats.process_fps is None and stats.capture_fps is None  # no stale rates
        await pilot.press("q")


# ------------------------------------------------------------------------------ panels


@run_async
async def test_the_error_screen_has_its_own_footer_and_the_stats_say_failed():
    def open_source(spec: str, fps):
        raise SourceError("video file nope.mp4 not found")

    app = OnsightApp(lambda: FakeEngine(), "nope.mp4", open_source=open_source)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
        await pilot.pause(0.1)
        keys = footer_keys(app)
        assert keys["r"][0] == "Retry" and keys["q"][0] == "Quit"
        assert "d" not in keys and "p" not in keys  # no demo offer for a file; no pause
        assert app.screen_stack[0].query_one(StatsPanel).source_status == "failed"
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 3


@run_async
async def test_slash_on_the_error_screen_leaves_its_keys_working():
    """Pressing "/" (a priority binding) moved focus to the question box hidden under the error
    screen: what was typed went there unseen, and r no longer retried."""
    opened: list[str] = []

    def open_source(spec: str, fps):
        opened.append(spec)
        if len(opened) == 1:
            raise SourceError("video file clip.mp4 not found")
        return ScriptedSource(2)

    app = OnsightApp(lambda: FakeEngine(), "clip.mp4", open_source=open_source)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.screen.query("#retry"))
        await pilot.press("slash", "question_mark", "r")
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) == 2)
        assert not isinstance(app.screen, ErrorScreen)
        assert app.query_one(QuestionInput).value == ""
        await pilot.press("q")
    assert len(opened) == 2


@run_async
async def test_stats_panel_says_what_its_numbers_are():
    app = make_app(count=8, period=0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        await pilot.pause(0.1)
        console = Console(width=60, file=io.StringIO(), color_system=None)
        console.print(app.query_one(StatsPanel)._render_stats())
        text = " ".join(console.file.getvalue().split())  # rows joined, padding dropped
        assert "evictions 0" in text and "holds 120 frames" in text
        assert "8 seen · 2 dropped" in text
        assert "idle 1.5" in text and "capture" not in text  # the wait, not a capture cost
        assert "fake:cpu · cpu" not in text  # the device once, not twice
        assert "skipped" not in text  # said only when duplicate skipping skipped something
        panel = app.query_one(StatsPanel)
        panel.stats = dataclasses.replace(panel.stats, frames_skipped=3)
        console.print(panel._render_stats())
        assert "2 dropped · 3 alike, skipped" in " ".join(console.file.getvalue().split())
        await pilot.press("q")


@run_async
async def test_typing_on_the_log_starts_a_question():
    """After a question, focus is back on the log; the next one typed straight away used to
    fire bindings letter by letter (s saved a snapshot, a q would quit)."""
    app = make_app(tickets=threading.Semaphore(1))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: log_of(app).plain("narration"))
        await press_text(pilot, "what is this")
        await pilot.press("enter")
        assert log_of(app).plain("question") == ["you › what is this"]
        assert app.last_saved is None and app.focused is log_of(app)
        # as a terminal sends it: every key queued before the first is handled
        for ch in "where is it?":
            app.post_message(events.Key({" ": "space", "?": "question_mark"}.get(ch, ch), ch))
        app.post_message(events.Key("enter", "\r"))
        await wait_for(pilot, lambda: len(log_of(app).plain("question")) == 2)
        assert log_of(app).plain("question")[1] == "you › where is it?"
        assert app.last_saved is None and app.return_code is None
        await pilot.press("p")  # a binding is still a binding
        assert app.paused
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None)
