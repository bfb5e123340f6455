"""How `onsight run` lets go: NarrationRun.release (worker stopped, then source, engine and
transcript closed, once, whatever the worker was doing), and a terminal that hangs up
without sending SIGHUP (a pty whose master closes, as sshd's does when a session drops)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from test_tui import FakeEngine, ScriptedSource

from onsight.runtime.transcript import Transcript
from onsight.tui.hangup import TerminalWatch
from onsight.tui.messages import Narrated, NarrationFailed, NarrationStopped
from onsight.tui.narration_run import NarrationRun
from onsight.tui.recorder import Recorder
from onsight.tui.signals import HANGUP_CODE, ExitOnSignals

TESTS = Path(__file__).resolve().parent


class CountingEngine(FakeEngine):
    def __init__(self, fail_close: bool = False) -> None:
        super().__init__()
        self.closes = 0
        self.fail_close = fail_close

    def close(self) -> None:
        self.closes += 1
        super().close()
        if self.fail_close:
            raise RuntimeError("driver crashed while closing")


class CountingTranscript(Transcript):
    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def start_run(tmp_path, engine_factory, sources: list[ScriptedSource]):
    """A NarrationRun narrating a scripted source in a worker thread; posts go to a list."""
    posted: list = []
    transcript = CountingTranscript(tmp_path / "run.jsonl")

    def open_source(spec, fps):
        sources.append(ScriptedSource(10_000, 0.01))
        return sources[-1]

    run = NarrationRun(engine_factory, open_source, Recorder(transcript), posted.append)
    assert run.begin()
    worker = threading.Thread(target=run.narrate, args=("scripted",), daemon=True)
    worker.start()
    return run, posted, transcript, worker


# ------------------------------------------------------------------------------ release


def test_release_stops_a_paused_worker_and_closes_everything_once(tmp_path):
    engine, sources = CountingEngine(), []
    run, posted, transcript, worker = start_run(tmp_path, lambda: engine, sources)
    assert wait_until(lambda: sum(isinstance(m, Narrated) for m in posted) >= 3)
    run.flowing.clear()  # paused: the worker waits on the gate, and must still see the stop
    run.release()
    run.release()  # q after a signal: nothing is closed twice
    worker.join(5)
    assert not worker.is_alive() and run.idle.is_set() and run.released.is_set()
    assert engine.closes == 1 and transcript.closes == 1
    assert sources[0].closed.is_set() and run.engine is None
    assert isinstance(posted[-1], NarrationStopped)
    assert not any(isinstance(m, NarrationFailed) for m in posted)  # closing is no failure
    assert all(json.loads(line) for line in transcript.path.read_text().splitlines())
    assert not run.begin()  # no retry starts a worker after quitting


def test_quitting_while_the_bundle_loads_closes_the_engine_when_it_arrives(tmp_path):
    engine, sources, loading = CountingEngine(), [], threading.Event()

    def slow_factory():
        loading.wait(5)
        return engine

    run, posted, _, worker = start_run(tmp_path, slow_factory, sources)
    releasing = threading.Thread(target=run.release, daemon=True)
    releasing.start()
    time.sleep(0.05)
    assert not run.released.is_set()  # release waits for the worker, not past it
    loading.set()
    releasing.join(5)
    assert run.released.is_set() and engine.closes == 1
    assert sources == []  # the source was never opened


def test_an_engine_that_arrives_after_release_gave_up_waiting_is_closed(tmp_path):
    """A load slower than the release's wait (a first TensorRT build): release() closes the
    rest and returns; the engine, when it arrives, is closed by the worker, not leaked."""
    engine, loading, sources = CountingEngine(), threading.Event(), []

    def slow_factory():
        loading.wait(5)
        return engine

    run, posted, transcript, worker = start_run(tmp_path, slow_factory, sources)
    run.timeout_s = 0.05
    run.release()
    assert run.released.is_set() and transcript.closes == 1 and engine.closes == 0
    loading.set()
    worker.join(5)
    assert engine.closes == 1 and run.engine is None and sources == []


def test_an_engine_that_fails_to_close_still_gets_the_transcript_closed(tmp_path, caplog):
    engine, sources = CountingEngine(fail_close=True), []
    run, posted, transcript, worker = start_run(tmp_path, lambda: engine, sources)
    assert wait_until(lambda: any(isinstance(m, Narrated) for m in posted))
    run.release()
    assert engine.closes == 1 and transcript.closes == 1 and run.released.is_set()
    assert "closing the engine failed" in caplog.text


# ------------------------------------------------------------------------------ hangups


@pytest.fixture
def pty_pair():
    if not hasattr(os, "openpty"):
        pytest.skip("no pseudo-terminals on this platform")
    try:
        master, slave = os.openpty()
    except OSError as e:
        pytest.skip(f"cannot open a pseudo-terminal: {e}")
    fds = {"master": master, "slave": slave}
    yield fds
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass  # closed by the test


def close_master(fds: dict[str, int]) -> None:
    os.close(fds.pop("master"))


def test_the_watch_reports_a_hung_up_terminal_once_and_silences_it(pty_pair):
    lost: list[float] = []
    watch = TerminalWatch(lambda: lost.append(time.monotonic()), [pty_pair["slave"]], every_s=0.02)
    watch.start()
    time.sleep(0.1)
    assert lost == []  # a live terminal is left alone
    close_master(pty_pair)  # the SSH session drops
    assert wait_until(lambda: lost)
    time.sleep(0.1)
    assert len(lost) == 1
    # What is still written there (Textual restoring the screen) goes to /dev/null, not EIO.
    assert os.write(pty_pair["slave"], b"\x1b[?1049l") == 8
    assert os.fstat(pty_pair["slave"]).st_rdev == os.stat(os.devnull).st_rdev


def test_a_stopped_watch_says_nothing_when_the_terminal_goes(pty_pair):
    lost: list[bool] = []
    watch = TerminalWatch(lambda: lost.append(True), [pty_pair["slave"]], every_s=0.02)
    watch.start()
    watch.stop()  # the app exited normally first
    close_master(pty_pair)
    time.sleep(0.2)
    assert lost == []


def test_a_hangup_and_a_signal_close_down_once_with_the_first_code():
    releases, codes = [], []
    guard = ExitOnSignals(
        lambda: releases.append(1), lambda code: None, grace_s=0.05, hard_exit=codes.append
    )
    guard.close_down(HANGUP_CODE)  # the terminal watch
    guard._handler(signal.SIGTERM, None)  # then a kill
    assert wait_until(lambda: codes)
    time.sleep(0.1)
    assert releases == [1] and codes == [128 + signal.SIGHUP]


CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_tui import FakeEngine, make_app
from onsight.runtime.transcript import Transcript

out = Path(sys.argv[2])
sources = []

class Engine(FakeEngine):
    def close(self):
        super().close()  # after the source: write down whether it was closed first
        closed = [s.closed.is_set() for s in sources]
        (out / "closed.json").write_text(json.dumps(closed))

if len(sys.argv) > 3:  # a slow watch: Textual may see the dead terminal first
    import functools
    from onsight.tui import hangup, signals
    signals.TerminalWatch = functools.partial(hangup.TerminalWatch, every_s=float(sys.argv[3]))

transcript = Transcript(out / "run.jsonl")
app = make_app(engine=Engine(), transcript=transcript, sources=sources, handle_signals=True)
app.run()
sys.exit(app.exit_code())  # as `onsight run` does
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pseudo-terminals")
@pytest.mark.parametrize("watch_every_s", [None, 2.0], ids=["watch", "slow-watch"])
def test_a_terminal_that_hangs_up_without_sighup_closes_the_app_down(
    pty_pair, tmp_path, watch_every_s
):
    """The real app on a pty in a session of its own, so closing the master (sshd after a
    dropped connection) sends it no SIGHUP: Textual's writer died on EIO and the app hung
    holding the source. Now it releases everything and exits 129 (SIGHUP's code), also when
    Textual's input thread fails on the dead terminal first and the app exits by itself."""
    master, slave = pty_pair["master"], pty_pair["slave"]
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(TESTS), str(tmp_path)]
        + ([str(watch_every_s)] if watch_every_s else []),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,  # the pty is not its controlling terminal: no SIGHUP
        env=env,
    )
    try:
        transcript = tmp_path / "run.jsonl"

        def narrating() -> bool:
            return transcript.exists() and transcript.read_text().count('"narration"') >= 3

        deadline = time.monotonic() + 15
        while not narrating() and time.monotonic() < deadline and child.poll() is None:
            if select.select([master], [], [], 0.05)[0]:
                os.read(master, 1 << 16)  # drain the screen, or the child blocks writing it
        assert narrating(), f"the app did not start narrating (exit code {child.poll()})"
        close_master(pty_pair)
        try:
            code = child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the app hung on the hung-up terminal")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == HANGUP_CODE
    assert json.loads((tmp_path / "closed.json").read_text()) == [True]  # source, then engine
    lines = transcript.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) >= 4
