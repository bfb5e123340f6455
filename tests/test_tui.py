"""`onsight run`: pilot tests with a scripted source and a fake engine, snapshots of the main
screen at two sizes, and one end-to-end run of the real app inside tmux on the demo video."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from onsight.runtime.capture import Source, SourceKind
from onsight.runtime.errors import BundleError, SourceError
from onsight.runtime.events import AnswerEvent, NarrationEvent, SourceEvent, StatsEvent
from onsight.runtime.frames import Frame
from onsight.runtime.transcript import Transcript
from onsight.tui.app import OnsightApp
from onsight.tui.narration_log import NarrationLog, clean_text, format_stamp
from onsight.tui.preview import Preview, fit_size, half_block_rows
from onsight.tui.stats_panel import fill_bar

REPO = Path(__file__).resolve().parents[1]
# `onsight run` with "--": the CLI's REMAINDER drops flags that come first otherwise.
RUN = ("run",)
T0 = 1_800_000_000.0  # fixed wall clock for the fake events, so snapshots are stable


# ------------------------------------------------------------------------------ fakes


def scripted_image(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A colour gradient with a white square that moves one step per frame."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 96)], -1).astype(np.uint8)
    s = (i * 6) % (w - 12)
    img[18:30, s : s + 12] = 255
    return img


class ScriptedSource(Source):
    """`count` frames, `period` seconds apart (0: as fast as consumed), then "ended".

    With `tickets`, each frame waits for a release() first: the test decides when frames
    arrive, and the event loop stays quiet while pilot keys are pressed."""

    def __init__(
        self,
        count: int,
        period: float = 0.0,
        tickets: threading.Semaphore | None = None,
        gap_at: int | None = None,
    ) -> None:
        super().__init__("scripted", SourceKind.FILE)
        self.count, self.period, self.tickets, self.gap_at = count, period, tickets, gap_at
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[Frame | SourceEvent]:
        yield SourceEvent("opened", self.name, "64x48 test pattern", wall_time=T0)
        for i in range(self.count):
            while self.tickets is not None and not self.tickets.acquire(timeout=0.05):
                if self.closed.is_set():
                    return
            if self.closed.wait(self.period) if self.period else self.closed.is_set():
                return
            if i == self.gap_at:
                yield SourceEvent("gap", self.name, "a frame could not be decoded", wall_time=T0)
            yield Frame(scripted_image(i), i * 0.5, i)
        yield SourceEvent("ended", self.name, "end of input", wall_time=T0 + self.count)

    def close(self) -> None:
        self.closed.set()


class FakeEngine:
    """The Assistant's verbs with scripted output: one narration line per frame, answers
    at the next frame after ask(), stats every few frames."""

    fps = 2.0

    def __init__(self, stats_every: int = 4) -> None:
        self.bundle = SimpleNamespace(name="fake-bundle", manifest={"mod": {"keep_ratio": 0.2}})
        self.backend = SimpleNamespace(name="fake:cpu", device="cpu")
        self.stats_every = stats_every
        self.questions: deque[str] = deque()
        self.processed = 0
        self.closed = False

    def narrate(self, source, max_frames=None) -> Iterator:
        try:
            for item in source:
                if isinstance(item, SourceEvent):
                    yield item
                    continue
                self.processed += 1
                wall = T0 + item.timestamp
                yield NarrationEvent(
                    f"line {item.index}: the square moves [right]",
                    item.index,
                    item.timestamp,
                    wall_time=wall,
                )
                while self.questions:
                    q = self.questions.popleft()
                    yield AnswerEvent(
                        q, f"a white square ({q})", item.index, item.timestamp, wall_time=wall
                    )
                if self.processed % self.stats_every == 0:
                    yield self.stats()
        finally:
            source.close()
        yield self.stats()

    def ask(self, question: str) -> None:
        self.questions.append(question)

    def answer_now(self) -> list:
        out = []
        while self.questions:
            q = self.questions.popleft()
            out.append(AnswerEvent(q, f"from memory ({q})", self.processed - 1, 0.0))
        return out

    def stats(self) -> StatsEvent:
        n = self.processed
        return StatsEvent(
            frames_captured=15 * n,
            frames_processed=n,
            frames_dropped=n // 4,
            stage_ms={
                "capture": 1.5,
                "preprocess": 0.4,
                "vision": 12.25,
                "prefill": 8.0,
                "decode": 31.0,
            },
            kv_fill=min(1.0, n / 40),
            kv_frames_fit=120,
            evictions=0,
            fps_processed=2.0,
            backend="fake:cpu",
            wall_time=T0 + n * 0.5,
        )

    def close(self) -> None:
        self.closed = True


def make_app(
    count: int = 10_000,
    period: float = 0.02,
    *,
    engine: FakeEngine | None = None,
    transcript: Transcript | None = None,
    sources: list[ScriptedSource] | None = None,
    tickets: threading.Semaphore | None = None,
    gap_at: int | None = None,
    **kw,
) -> OnsightApp:
    engine = engine or FakeEngine()
    opened = sources if sources is not None else []

    def open_source(spec: str, fps: float | None) -> Source:
        src = ScriptedSource(count, period, tickets, gap_at)
        opened.append(src)
        return src

    return OnsightApp(
        lambda: engine, "scripted", open_source=open_source, transcript=transcript, **kw
    )


def run_async(fn):
    """No asyncio plugin in the dev extra: each pilot test is an async body run here."""

    @functools.wraps(fn)  # keeps the signature, so pytest still injects fixtures
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


async def wait_for(pilot, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


def log_of(app: OnsightApp) -> NarrationLog:
    return app.query_one(NarrationLog)


async def press_text(pilot, text: str) -> None:
    await pilot.press(*["space" if c == " " else c for c in text])


# ------------------------------------------------------------------------------ units


def test_clean_text_and_stamps():
    assert clean_text("\bfr\x1e33 [bold]x[/]\u202e") == "\ufffdfr\ufffd33 [bold]x[/]\ufffd"
    assert format_stamp(None) == "--:--.-"
    assert format_stamp(75.25) == "01:15.2"
    assert format_stamp(3725) == "1:02:05"
    assert fill_bar(0.0) == "░" * 16 and fill_bar(1.0) == "█" * 16
    assert fill_bar(0.5).startswith("█" * 8) and len(fill_bar(0.37)) == 16


def test_half_block_rows_keep_aspect_and_colours():
    assert fit_size(640, 480, 40, 10) == (27, 20)  # height-bound: 20 pixel rows in 10 cells
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2] = (255, 0, 0)  # top half red, bottom half blue
    img[2:] = (0, 0, 255)
    rows = half_block_rows(img, 4, 2)
    assert len(rows) == 2
    seg = rows[0][0]
    assert seg.text == "▀▀▀▀"
    assert seg.style.color.triplet == (255, 0, 0) and seg.style.bgcolor.triplet == (255, 0, 0)
    assert rows[1][0].style.color.triplet == (0, 0, 255)


# ------------------------------------------------------------------------------ pilot


@run_async
async def test_narration_lines_appear_in_order_and_preview_follows():
    app = make_app(count=8, period=0.01)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        await wait_for(pilot, lambda: app.query_one(Preview).frame_index == 7)
        lines = log_of(app).plain("narration")
        assert lines == [f"line {i}: the square moves [right]" for i in range(8)]
        sources = log_of(app).plain("source")
        assert sources[0].startswith("· opened") and sources[-1].startswith("· ended")
        await pilot.press("q")


@run_async
async def test_question_gets_answered_in_the_log():
    tickets = threading.Semaphore(2)
    app = make_app(tickets=tickets)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) == 2)
        await pilot.press("slash")
        await press_text(pilot, "what moves")
        await pilot.press("enter")
        assert not log_of(app).plain("answer")  # answered at the next frame boundary
        tickets.release()
        await wait_for(pilot, lambda: log_of(app).plain("answer"))
        assert log_of(app).plain("question") == ["you › what moves"]
        assert log_of(app).plain("answer") == ["onsight › a white square (what moves)"]
        assert app.focused is log_of(app)  # back on the log: single-key bindings work
        await pilot.press("q")


@run_async
async def test_a_question_after_the_video_ended_is_answered_from_what_was_seen():
    app = make_app(count=3, period=0.01)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        await pilot.press("slash")
        await press_text(pilot, "what moved")
        await pilot.press("enter")
        await wait_for(pilot, lambda: log_of(app).plain("answer"))
        assert log_of(app).plain("answer") == ["onsight › from memory (what moved)"]
        await pilot.press("q")


@run_async
async def test_keys_typed_fast_after_slash_land_in_the_question_box():
    """A terminal delivers "/what is this?" in one read: every key after "/" must reach the
    box (not trigger s or q on the log), and "/" or "?" inside the question are text."""
    from textual import events

    app = make_app(tickets=threading.Semaphore(1))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) == 1)
        names = {"/": "slash", " ": "space", "?": "question_mark"}
        for ch in "/is it a/b test? yes":
            app.post_message(events.Key(names.get(ch, ch), ch))
        app.post_message(events.Key("enter", "\r"))
        await wait_for(pilot, lambda: log_of(app).plain("question"))
        assert log_of(app).plain("question") == ["you › is it a/b test? yes"]
        assert app.last_saved is None and app.return_code is None
        await pilot.press("q")


@run_async
async def test_pause_stops_new_lines_and_resume_continues():
    app = make_app(period=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) >= 3)
        await pilot.press("p")
        await pilot.pause(0.2)  # let messages already posted drain
        paused_at = len(log_of(app).plain("narration"))
        await pilot.pause(0.5)  # ten frames' worth
        assert len(log_of(app).plain("narration")) == paused_at
        assert app.query_one("#stats").paused
        await pilot.press("p")
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) >= paused_at + 3)
        await pilot.press("q")


@run_async
async def test_quit_closes_cleanly_and_saves_the_transcript(tmp_path):
    engine = FakeEngine()
    sources: list[ScriptedSource] = []
    path = tmp_path / "sub" / "run.jsonl"
    app = make_app(engine=engine, transcript=Transcript(path), sources=sources)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) >= 3)
        await pilot.press("p")  # quitting while paused must not hang on the gate
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 0
    assert engine.closed and all(s.closed.is_set() for s in sources)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [r["type"] for r in records]
    assert kinds[0] == "source" and kinds.count("narration") >= 3
    assert records[1]["text"] == "line 0: the square moves [right]"


@run_async
async def test_snapshot_key_saves_png_and_transcript(tmp_path):
    import cv2

    app = make_app(count=3, period=0.0, save_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.narration_done)
        await pilot.press("s")
        await wait_for(pilot, lambda: app.last_saved is not None)
        image, text = app.last_saved
        await pilot.press("q")
    png = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(png, scripted_image(2))  # the current frame, in RGB order
    assert sum(json.loads(x)["type"] == "narration" for x in text.read_text().splitlines()) == 3


@run_async
async def test_preview_hides_and_shows():
    app = make_app(count=2, period=0.0)
    async with app.run_test(size=(100, 30)) as pilot:
        preview = app.query_one(Preview)
        assert preview.display
        await pilot.press("v")
        assert not preview.display
        await pilot.press("v")
        assert preview.display
        await pilot.press("q")


@run_async
async def test_bundle_failure_shows_error_screen_and_retry_recovers():
    attempts = []

    def factory():
        attempts.append(1)
        if len(attempts) == 1:
            raise BundleError("bundle engines/x: bundle.json is missing; re-export it")
        return FakeEngine()

    app = OnsightApp(factory, "scripted", open_source=lambda spec, fps: ScriptedSource(3), fps=None)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.screen.query("#retry"))
        await pilot.press("r")
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) == 3)
        await pilot.press("q")
    assert len(attempts) == 2


@run_async
async def test_missing_camera_offers_the_demo_video(tmp_path):
    opened: list[str] = []

    def open_source(spec: str, fps):
        opened.append(spec)
        if spec == "0":
            raise SourceError("camera 0 could not be opened: no such device /dev/video0")
        return ScriptedSource(2)

    app = OnsightApp(
        lambda: FakeEngine(),
        "0",
        open_source=open_source,
        demo_video=lambda: tmp_path / "demo.mp4",
    )
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.screen.query("#demo"))  # the screen is composed
        await pilot.press("d")
        await wait_for(pilot, lambda: len(log_of(app).plain("narration")) == 2)
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert opened == ["0", str(tmp_path / "demo.mp4")]
    assert app.return_code == 0


@run_async
async def test_quitting_from_the_error_screen_exits_with_the_source_code():
    def open_source(spec: str, fps):
        raise SourceError("video file nope.mp4 not found")

    app = OnsightApp(lambda: FakeEngine(), "nope.mp4", open_source=open_source)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.screen.query("#retry"))  # the error screen is up
        assert not app.screen.query("#demo")  # a file, not a camera: no demo offer
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 3


# ------------------------------------------------------------------------------ snapshots


def _settled_app() -> OnsightApp:
    """Twelve frames, a question answered at the first, a decode gap at the seventh."""
    engine = FakeEngine()
    engine.ask("what moves?")
    return make_app(count=12, period=0.0, engine=engine, gap_at=6)


async def _settle(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.narration_done)
    await wait_for(pilot, lambda: app.query_one(Preview).frame_index == 11)
    await pilot.pause(0.1)


@pytest.mark.parametrize("size", [(100, 30), (160, 45)], ids=["100x30", "160x45"])
def test_main_screen_snapshot(snap_compare, size):
    assert snap_compare(_settled_app(), terminal_size=size, run_before=_settle)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="session")
def run_bundle(tmp_path_factory) -> Path:
    """The shipped demo bundle when it is there, else a tiny random one (it narrates
    gibberish, but it narrates: enough to prove the app end to end)."""
    shipped = REPO / "engines" / "demo"
    if (shipped / "bundle.json").is_file():
        return shipped
    torch = pytest.importorskip("torch", reason="building a test bundle needs the exporter extra")
    from builders import build_tokenizer, llama_config

    from onsight.exporter.bundle_writer import ExportOptions, export_bundle
    from onsight.exporter.config import ModConfig, ModelConfig, PreprocessConfig, VisionConfig
    from onsight.exporter.model import StreamingModel, load_native, save_native

    base = tmp_path_factory.mktemp("tui-bundle")
    tok, vocab = build_tokenizer(base / "tok")
    cfg = ModelConfig(
        decoder=llama_config(vocab),
        vision=VisionConfig(kind="tiny", hidden_size=32, tiny_channels=(8, 16)),
        preprocess=PreprocessConfig(image_size=32),
        mod=ModConfig(keep_ratio=0.2, layers=(1, 3), router="learned"),
        has_layer_experts=True,
    )
    torch.manual_seed(0)
    ckpt = save_native(StreamingModel(cfg).eval(), tok, base / "native")
    model, tokenizer = load_native(ckpt)
    opts = ExportOptions(kv_capacity=512, parity_frames=2)  # parity is test_export's job
    out, _ = export_bundle(model, tokenizer, base / "bundle", opts)
    return out


def _tmux(socket: str, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["tmux", "-S", socket, *args], capture_output=True, text=True, check=check, timeout=30
    )
    return done.stdout


STAMPED = re.compile(r"\d\d:\d\d\.\d  (\S.*?)\s*│")  # a log row: stream time, then text


def narration_rows(pane: str) -> list[str]:
    """Log rows that are narration: not source notes (·), warnings (!), questions, answers."""
    rows = [m.group(1) for m in STAMPED.finditer(pane)]
    return [r for r in rows if not r.startswith(("·", "!", "you ›", "onsight ›"))]


def _wait_pane(socket: str, done, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    pane = ""
    while time.monotonic() < deadline:
        pane = _tmux(socket, "capture-pane", "-p", "-t", "run", check=False)
        if done(pane):
            break
        time.sleep(0.3)
    return pane


def test_real_app_in_tmux_narrates_and_quits_with_0(run_bundle, tmp_path):
    """The installed app, a real bundle, an mp4 file, a real terminal (tmux): narration
    shows up, a question typed into the box is answered, q exits 0, the transcript is kept.
    The file is the demo video (the world the shipped model narrates; on ../shared/videos'
    real footage it stays silent, as it should).
    """
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    from onsight.runtime.synthetic import render_demo_video

    video = render_demo_video(tmp_path / "demo.mp4", seed=0, seconds=60, write_events=False).path
    socket = str(tmp_path / "tmux.sock")  # a private tmux server, killed below
    exit_file = tmp_path / "exit"
    transcript = tmp_path / "run.jsonl"
    cmd = (
        f"cd {tmp_path} && {sys.executable} -m onsight.runtime.cli {' '.join(RUN)} "
        f"--engine {run_bundle} "
        f"--source {video} --backend onnxruntime:cpu --max-new-tokens 6 "
        f"--transcript {transcript} --log-file {tmp_path / 'run.log'}; "
        f"echo EXIT=$? > {exit_file}"
    )
    # Give the pane its size from the start (tmux's default is 80x24 until -x/-y apply); the
    # shell may export COLUMNS/LINES from that first size, which `onsight run` must ignore.
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g default-size 120x36\n")
    _tmux(socket, "-f", str(conf), "new-session", "-d", "-x", "120", "-y", "36", "-s", "run", cmd)
    try:
        # The first processed frame shows in the stats panel; then ask something, which is
        # answered at the next frame even by a model that chooses to stay silent.
        processed = re.compile(r"frames\s+[1-9]\d* seen")
        pane = _wait_pane(socket, processed.search, 60)
        assert processed.search(pane), f"no frame processed:\n{pane}"
        _tmux(socket, "send-keys", "-t", "run", "/what do you see", "Enter")
        pane = _wait_pane(socket, lambda p: "onsight ›" in p and narration_rows(p), 30)
        assert "you › what do you see" in pane, f"question not shown:\n{pane}"
        assert "onsight ›" in pane, f"no answer on screen:\n{pane}"
        assert narration_rows(pane), f"no narration on screen:\n{pane}"
        _tmux(socket, "send-keys", "-t", "run", "q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.exists(), "onsight run did not exit after q"
        assert exit_file.read_text().strip() == "EXIT=0"
        kinds = [json.loads(x)["type"] for x in transcript.read_text().splitlines()]
        assert kinds[0] == "source" and "narration" in kinds and "answer" in kinds
    finally:
        _tmux(socket, "kill-server", check=False)
