"""The worker side of `onsight run`: the engine and the tapped source, opened, narrated into
posted messages, paused, and let go of once when the run ends.

`narrate` is the narrate worker's body; the app sees what it does only as messages
(messages.py). `release` is the one way out, whichever comes first (q, Ctrl-C, a signal, a
terminal that hung up, an unmount): it stops the worker, then closes the source (which ends
a camera blocked waiting for a frame), the engine and the transcript, from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from textual.message import Message

from onsight.runtime.errors import OnsightError, SourceError

from .engine import (
    GATE_POLL_S,
    Engine,
    EngineFactory,
    SourceOpener,
    TappedSource,
    describe_engine,
    is_camera,
)
from .messages import (
    EngineLoaded,
    NarrationFailed,
    NarrationStopped,
    SourceOpened,
    Status,
    message_for,
)
from .recorder import Recorder

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 20.0  # longest wait for the narrate worker on quit (one slow frame)


class NarrationRun:
    """One engine narrating one source for the app.

    Shared between worker threads and the UI thread: each attribute is written by one side
    only or is an Event, except `engine`, which the worker sets and release() takes, both
    under the release lock."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        open_source: SourceOpener,
        recorder: Recorder,
        post: Callable[[Message], object],
        *,
        fps: float | None = None,
        demo_video: Callable[[], Path] | None = None,
        use_demo: bool = False,
        timeout_s: float = SHUTDOWN_TIMEOUT_S,
    ) -> None:
        """post: hands a message to the app from any thread (the app's post_message)."""
        self._engine_factory = engine_factory
        self._open_source = open_source
        self._recorder = recorder
        self._post = post
        self._fps = fps
        self.demo_video = demo_video
        self.use_demo = use_demo and demo_video is not None  # the UI sets it on "demo"
        self.timeout_s = timeout_s

        self.engine: Engine | None = None  # loaded once, kept across retries
        self.tap: TappedSource | None = None  # the open source; the preview reads .latest
        self.flowing = threading.Event()  # clear while paused
        self.flowing.set()
        self.stop = threading.Event()  # quitting: workers wind down
        self.idle = threading.Event()  # no narrate worker is running
        self.idle.set()
        self.released = threading.Event()  # engine, source and transcript are closed
        self._release_lock = threading.Lock()

    def begin(self) -> bool:
        """UI thread, before starting the narrate worker: False once quitting."""
        if self.stop.is_set():
            return False
        self.idle.clear()
        return True

    def narrate(self, spec: str) -> None:
        """The narrate worker's body: load the engine (once), open `spec`, narrate until the
        source ends or release(); failures are posted as NarrationFailed, never raised."""
        stage = "bundle"
        try:
            engine = self.engine
            if engine is None:
                self._post(Status("loading engine ..."))
                engine = self._engine_factory()
                with self._release_lock:
                    if self.released.is_set():
                        # release() gave up waiting for a slow load (SHUTDOWN_TIMEOUT_S) and
                        # closed everything else: the engine is this thread's to close
                        engine.close()
                        return
                    self.engine = engine  # release closes it from here on
                if self.stop.is_set():
                    return
                fps = self._fps or getattr(engine, "fps", None)
                self._post(EngineLoaded(describe_engine(engine, fps)))
            stage = "source"
            if self.use_demo and self.demo_video is not None:
                self._post(Status("preparing the demo video ..."))
                spec = str(self.demo_video())
            self._post(Status(f"opening {spec} ..."))
            fps = self._fps or getattr(engine, "fps", None)
            tap = TappedSource(self._open_source(spec, fps), self.flowing)
            self.tap = tap
            if self.stop.is_set():
                tap.close()
                return
            self._post(SourceOpened(spec))
            self._consume(engine, tap)
        except SourceError as e:
            self._fail("source", e, spec)
        except OnsightError as e:
            self._fail("engine" if stage == "source" else stage, e, spec)
        except Exception as e:  # a bug must reach the screen, not vanish with the thread
            log.exception("narration failed")
            self._fail("engine" if stage == "source" else stage, e, spec)
        finally:
            self.idle.set()
            self._post(NarrationStopped())

    def _consume(self, engine: Engine, tap: TappedSource) -> None:
        events = engine.narrate(tap)
        try:
            for event in events:
                # The LLM runs inside next(events); not calling it while paused stops the
                # model too, and an event that was already in flight waits here.
                while not self.flowing.wait(GATE_POLL_S):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                self._recorder.record(event)
                self._post(message_for(event))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # runs narrate()'s finally: the pipeline and the source shut down

    def _fail(self, stage: str, error: BaseException, spec: str) -> None:
        if self.stop.is_set():
            return  # errors while shutting down are expected (closed source, closed engine)
        text = str(error) or repr(error)
        code = error.exit_code if isinstance(error, OnsightError) else 1
        offer = stage == "source" and self.demo_video is not None and is_camera(spec)
        self._post(NarrationFailed(stage, text, code, offer))  # type: ignore[arg-type]

    def release(self) -> None:
        """Stop the worker, then close source, engine and transcript (idempotent, any thread)."""
        self.stop.set()
        self.flowing.set()  # a paused worker must see the stop
        tap = self.tap
        if tap is not None:
            tap.close()  # ends a source blocked waiting for frames
        if not self.idle.wait(self.timeout_s):
            log.warning("narration did not stop within %.0f s; closing anyway", self.timeout_s)
        with self._release_lock:
            if self.released.is_set():
                return
            engine, self.engine = self.engine, None
            if engine is not None:
                try:
                    engine.close()
                except Exception:
                    log.exception("closing the engine failed")
            self._recorder.close()
            self.released.set()

    def release_in_background(self) -> None:
        """release() on a thread of its own, so the event loop is not held up by a camera's
        close (an exit without the quit action: a test harness, a crash)."""
        if not self.released.is_set():
            threading.Thread(target=self.release, name="onsight release", daemon=True).start()
