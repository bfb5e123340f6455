"""The embedding API: `with Assistant("engines/demo") as a: for event in a.narrate(0): ...`.

Three verbs: `narrate(source)` iterates typed events, `ask(question)` queues a question for
the next frame boundary (and returns a Future of its answer, for a thread that wants to wait
for it), `push(frame, timestamp)` feeds a frame from a camera you own.
Capture, preprocessing and the vision encoder run on their own threads, overlapped with the
LLM (onnxruntime releases the GIL); the LLM loop runs in the thread that iterates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onsight.runtime.assistant_config import AssistantConfig
from onsight.runtime.backends import make_backend
from onsight.runtime.bundle import load_bundle
from onsight.runtime.errors import OnsightError
from onsight.runtime.events import (
    AnswerEvent,
    Event,
    EventClock,
    NarrationEvent,
    SourceEvent,
    StatsEvent,
    WarningEvent,
)
from onsight.runtime.frames import Frame, check_image, check_timestamp
from onsight.runtime.preprocess import letterbox
from onsight.runtime.pruning import FrameFilter, pruning_supported
from onsight.runtime.questions import (
    Asked,
    check_question,
    fail,
    question_budget,
    settle,
)
from onsight.runtime.stepper import TimedStepper
from onsight.runtime.stream_loop import FrameOutcome, Sampler, StreamLoop
from onsight.runtime.template import bundle_template_ids
from onsight.runtime.tokens import Tokens

log = logging.getLogger(__name__)


class _Closed(OnsightError):
    """The Assistant was closed (an OnsightError for callers)."""


class Assistant:
    """A bundle, a backend, a KV cache and the speak-or-stay-silent loop. Thread-safe."""

    def __init__(self, engine: str | Path, config: AssistantConfig | None = None):
        self.config = config or AssistantConfig()
        self.bundle = load_bundle(engine)
        # the tokenizer and its agreement with bundle.json are checked before any session loads
        self.tokens = Tokens(self.bundle.tokenizer_path)
        template = bundle_template_ids(self.tokens.tok, self.bundle)
        self.backend = make_backend(self.bundle, self.config.backend, self.config.threads)
        log.info("bundle %s on %s", self.bundle.name, self.backend.name)
        gen = self.bundle.generation
        self.fps = float(self.config.fps if self.config.fps is not None else gen.get("fps", 2.0))
        self._stepper = TimedStepper(self.backend.stepper())
        self._questions: deque[str] = deque()  # shared by every loop: ask() never waits
        self._clock = EventClock()  # stamps each event's wall_time as it is handed out
        self._loop = StreamLoop(
            self._stepper,
            template,
            encode=self.tokens.encode,
            threshold=float(gen["threshold"]),
            max_new_tokens=int(
                self.config.max_new_tokens
                if self.config.max_new_tokens is not None
                else gen["max_new_tokens"]
            ),
            sampler=Sampler(temperature=self.config.temperature),
            questions=self._questions,
        )
        self._max_new_tokens = self._loop.max_new_tokens
        self._max_question = question_budget(self.bundle, self._loop.t, self._max_new_tokens)
        if self._max_question < 16:
            log.warning(
                "with answers of up to %d tokens, this bundle's KV cache leaves room for "
                "questions of only %d tokens; lower max_new_tokens (--max-new-tokens) or "
                "re-export with a larger --kv-capacity",
                self._max_new_tokens,
                self._max_question,
            )
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # close() waits on it for work in flight
        self._inflight: Counter[int] = Counter()  # thread id -> calls in flight on it
        self._narrating: tuple | None = None  # (source, pipeline) of the running narrate()
        self._closed = False
        self._released = False
        self._last_timestamp: float | None = None
        self._last_frame: Frame | None = None  # the last frame processed
        self._processed = 0
        self._captured = 0
        self._dropped = 0
        self._stage_ms: dict[str, float] = {}
        self._last_stats: StatsEvent | None = None  # as of the last frame done
        self._t0 = time.perf_counter()
        self._filter = FrameFilter(  # reads self.config at each frame; pruning is fixed here
            self.bundle.layout.k,
            self.config.prune_static_tokens and pruning_supported(self.backend),
        )

    # ---- the three verbs ----

    def ask(self, question: str) -> Future[AnswerEvent]:
        """Queue a question; its AnswerEvent follows the next processed frame (in the events
        of that frame's `push()` or `narrate()`, or of `answer_now()`). Never waits for the
        frame being processed.

        Returns a `concurrent.futures.Future` that the same AnswerEvent completes, so another
        thread can wait for it: `a.ask("is the door open?").result(timeout=5)`. It fails with
        OnsightError if the Assistant is closed first or answering fails; cancelling it only
        drops the result (the question is still answered in the stream). Wait on it from a
        thread other than the one that pushes frames or iterates `narrate()` (that thread
        answers it); its callbacks run on that thread, inside the frame, so keep them short.

        Raises OnsightError for a question that is not a string, empty, or longer than the
        bundle's KV cache can hold in one turn (`max_question_tokens`)."""
        self._check_open()
        q = Asked(
            check_question(question, self.tokens.encode, self._max_question, self._max_new_tokens)
        )
        self._questions.append(q)  # deque.append is atomic
        if self._closed:  # closed since the check: close() may have failed the queue already
            fail([q], _Closed("this Assistant was closed before the question was answered"))
        return q.future

    def answer_now(self) -> list[Event]:
        """Answer the questions asked so far without waiting for a frame, from what the KV
        cache holds (after a file ended, or while a camera is paused); their AnswerEvents
        carry the last frame's index and timestamp. [] before the first frame (questions then
        wait for it)."""
        with self._lock, self._working():
            last = self._last_frame
            if last is None:
                return []
            with self._step(f"answering failed after frame {last.index}"):
                answers = self._loop.answer_pending()
            return self._clock.stamp_all(
                [self._answered(q, ids, last.index, last.timestamp) for q, ids in answers]
            )

    def max_question_tokens(self) -> int:
        """The longest question (in tokens) `ask()` takes (see `question_budget`)."""
        return self._max_question

    def push(self, image: np.ndarray, timestamp: float | None = None) -> list[Event]:
        """Process one frame now; returns the events it produced.

        `image` is (H, W, 3) uint8 in RGB order: OpenCV's `cv2.VideoCapture` and `cv2.imread`
        give BGR, so pass `cv2.cvtColor(img, cv2.COLOR_BGR2RGB)` (or `img[..., ::-1]`), else
        colours come out swapped. `timestamp` is in seconds (None: `time.monotonic()`);
        a timestamp earlier than the last one is accepted with a WarningEvent.
        Raises OnsightError for a frame or timestamp it cannot take, or while `narrate()`
        runs on this Assistant (and counts no frame)."""
        self._check_open()
        img = check_image(image)
        # None is read under the lock below, so threads' clocks stay in order
        ts = None if timestamp is None else check_timestamp(timestamp)
        warnings: list[Event] = []
        with self._lock:
            if self._narrating:
                # the pushed frame would land between the source's frames in the KV cache
                # (the stream's memory) and reuse their frame indices
                raise OnsightError(
                    "push(): this Assistant is narrating a source; one Assistant takes one "
                    "stream: push to another Assistant, or push after narrate() has ended "
                    "(iterated to its end, or its iterator closed with .close())"
                )
            if ts is None:
                ts = time.monotonic()
            if self._last_timestamp is not None and ts < self._last_timestamp:
                warnings.append(
                    self.warn(
                        f"frame timestamp {ts:.3f} s is earlier than the last one "
                        f"({self._last_timestamp:.3f} s); give push() increasing timestamps"
                    )
                )
            self._last_timestamp = ts
            frame = Frame(img, ts, self._captured)
            self._captured += 1
        with self._working():
            t = time.perf_counter()
            pixels = self._preprocess(frame)
            t1 = time.perf_counter()
            embeds = self.backend.encode(pixels[None])[0]
            self._stage_ms.update(
                preprocess=(t1 - t) * 1e3, vision=(time.perf_counter() - t1) * 1e3
            )
            return self._clock.stamp_all(warnings + list(self._on_embeds(frame, embeds)))

    def narrate(self, source, max_frames: int | None = None) -> Iterator[Event]:
        """Narrate a source (camera index, file, URL, pipeline, image folder, or an open
        capture Source); yields events until the source ends or max_frames are processed."""
        from onsight.runtime.capture import CaptureOptions, Pipeline, Source, Stage, open_source

        self._check_open()
        from onsight.runtime.synthetic.cli import resolve_source

        if max_frames is not None and max_frames < 1:
            if isinstance(source, Source):
                source.close()  # it was handed over to be read and closed
            raise OnsightError(f"narrate(): max_frames={max_frames!r}: give >= 1, or None")
        if isinstance(source, Source):
            src = source
        else:
            src = open_source(
                resolve_source(source),
                fps=self.fps,
                realtime=self.config.realtime,
                options=CaptureOptions(decode_workers=max(1, self.config.decode_workers)),
            )
        pipe = Pipeline(
            [
                Stage("preprocess", self._preprocess_item, passthrough=(SourceEvent,)),
                Stage("vision", self._vision_item, passthrough=(SourceEvent,)),
            ],
            queue_size=2,
        )
        done = 0
        last_stats: StatsEvent | None = None
        with self._lock:
            if self._closed or self._narrating:
                src.close()
                self._check_open()
                raise OnsightError(
                    "this Assistant is already narrating a source: one Assistant narrates one "
                    "stream (its KV cache is that stream's memory); create another Assistant "
                    "for a second source"
                )
            self._narrating = (src, pipe)
        try:
            waited = time.perf_counter()
            for item in pipe.run(src):
                if self._closed:  # closed from another thread: end the stream quietly
                    break
                if isinstance(item, SourceEvent):  # made when read, stamped when handed out
                    yield self._clock.stamp(item)
                    continue
                frame, embeds = item
                self._stage_ms.update(pipe.stage_ms())
                self._stage_ms["capture"] = (time.perf_counter() - waited) * 1e3
                st = src.stats()
                self._captured, self._dropped = st.frames_captured, st.frames_dropped
                try:
                    events = list(self._on_embeds(frame, embeds))
                except _Closed:
                    break
                yield from map(self._clock.stamp, events)
                if events and isinstance(events[-1], StatsEvent):
                    last_stats = events[-1]
                done += 1
                if max_frames is not None and done >= max_frames:
                    break
                waited = time.perf_counter()
        finally:
            with self._lock:
                self._narrating = None
            pipe.close()
            st = src.stats()  # what the source read in the end, not at the last frame
            self._captured, self._dropped = st.frames_captured, st.frames_dropped
            src.close()
        with self._lock:
            if self._closed:
                return
            # the last frame's StatsEvent already closes the run unless frames came after it
            final = None
            if last_stats is None or last_stats.frames_processed != self._processed:
                final = self.stats()
        if final is not None:
            yield final  # stamped by stats()

    # ---- internals ----

    def _preprocess(self, frame: Frame) -> np.ndarray:
        pre = self.bundle.manifest["preprocess"]
        return letterbox(
            frame.image,
            int(pre["image_size"]),
            int(pre.get("pad_value", 0)),
            pre.get("interpolation", "bicubic"),
        )

    def _preprocess_item(self, frame: Frame) -> tuple[Frame, np.ndarray]:
        return frame, self._preprocess(frame)

    def _vision_item(self, item: tuple[Frame, np.ndarray]) -> tuple[Frame, np.ndarray]:
        frame, pixels = item
        try:
            with self._working():
                return frame, self.backend.encode(pixels[None])[0]
        except _Closed:  # the narrate loop sees the Assistant closed and stops
            return frame, np.zeros((0,), np.float32)

    @contextmanager
    def _step(self, failure: str):
        """Run one step of the loop: if it raises, the questions it took from the queue (also
        those asked on other threads meanwhile) have their Futures failed, so none waits
        forever; an Exception is raised as OnsightError(`failure`: ...), a KeyboardInterrupt
        as itself."""
        try:
            yield
        except BaseException as e:
            err = OnsightError(f"{failure}: {e}")
            fail(self._loop.taken, err)
            if not isinstance(e, Exception):
                raise
            raise err from e

    @contextmanager
    def _working(self):
        """Hold the sessions open while this block runs: close() from another thread waits
        for it; close() from this very thread (a signal handler, a callback) leaves the
        release to its end."""
        me = threading.get_ident()
        with self._lock:
            self._inflight[me] += 1  # counted before the check: a close() from a signal
            try:  # handler in between then defers its release to our exit
                self._check_open()
            except _Closed:
                self._leave(me)
                raise
        try:
            yield
        finally:
            with self._lock:
                self._leave(me)

    def _leave(self, me: int) -> None:
        """One call on thread `me` is done (under the lock); the last one out after
        close() releases the sessions."""
        self._inflight[me] -= 1
        if not self._inflight[me]:
            del self._inflight[me]
        self._idle.notify_all()
        if self._closed and not self._inflight:
            self._release()

    def _on_embeds(self, frame: Frame, embeds: np.ndarray) -> Iterator[Event]:
        with self._lock, self._working():
            admitted, keep = self._filter.admit(
                embeds, self._processed, bool(self._loop.questions), self.config
            )
            if not admitted:
                return
            self._stepper.decode_ms = 0.0
            with self._step(f"inference failed at frame {frame.index}"):
                out: FrameOutcome = self._loop.on_frame(embeds, keep)
            self._processed += 1
            self._last_frame = frame
            self._stage_ms.update(prefill=self._stepper.prefill_ms, decode=self._stepper.decode_ms)
            events: list[Event] = []
            if out.speak and out.narration:
                events.append(
                    NarrationEvent(self.tokens.decode(out.narration), frame.index, frame.timestamp)
                )
            for q, ids in out.answers:
                events.append(self._answered(q, ids, frame.index, frame.timestamp))
            self._last_stats = self._stats()  # what stats() gives while the next frame runs
            if self._processed % max(1, self.config.stats_every) == 0:
                events.append(self._last_stats)
        yield from events

    def _answered(self, q: str, ids: list[int], index: int, timestamp: float) -> AnswerEvent:
        """The AnswerEvent of question `q`; its `ask()` Future gets it at once, stamped now
        (the stream's copy is stamped when handed out)."""
        event = AnswerEvent(str(q), self.tokens.decode(ids), index, timestamp)
        settle(q, self._clock.stamp(event))
        return event

    def stats(self) -> StatsEvent:
        """Timings, KV fill, frames processed and dropped. Never waits for a frame being
        processed on another thread (one answering many questions can take seconds): it
        then gives the stats as of the last frame done."""
        self._check_open()
        if self._lock.acquire(blocking=False):
            try:
                with self._working():
                    return self._clock.stamp(self._stats())
            finally:
                self._lock.release()
        last = self._last_stats
        if last is not None:
            return self._clock.stamp(last)
        with self._lock, self._working():  # the first frame is still running: wait for it
            return self._clock.stamp(self._stats())

    def _stats(self) -> StatsEvent:
        cache = self._stepper.inner.cache
        elapsed = max(1e-9, time.perf_counter() - self._t0)
        return StatsEvent(
            frames_captured=max(self._captured, self._processed),
            frames_processed=self._processed,
            frames_dropped=self._dropped,
            # dict() copies in one step: push()/narrate() update it outside the lock
            stage_ms={k: round(v, 3) for k, v in dict(self._stage_ms).items()},
            kv_fill=round(cache.fill(), 4),
            kv_frames_fit=cache.frames_fit(),
            evictions=cache.evictions,
            fps_processed=round(self._processed / elapsed, 3),
            backend=self.backend.name,
            tokens_pruned=self._filter.pruned,
            frames_skipped=self._filter.skipped,
        )

    def warn(self, message: str) -> WarningEvent:
        """Log `message` and return it as a WarningEvent (stamped on this Assistant's clock),
        for callers that report problems among the events."""
        log.warning("%s", message)
        return self._clock.stamp(WarningEvent(message))

    @property
    def closed(self) -> bool:
        """True once close() was called (every later call raises OnsightError)."""
        return self._closed

    def reset(self) -> None:
        """Forget the stream (empty the KV cache); the next frame starts a new one.
        Questions already asked and not yet answered are kept for that frame."""
        with self._lock, self._working():
            self._stepper.inner.reset()
            self._loop = StreamLoop(
                self._stepper,
                self._loop.t,
                self._loop.encode,
                self._loop.threshold,
                self._loop.max_new_tokens,
                self._loop.sample,
                questions=self._questions,  # questions asked and not yet answered stay
            )
            self._filter.forget()
            self._last_timestamp = None
            self._last_frame = None

    def _check_open(self) -> None:
        if self._closed:
            raise _Closed("this Assistant is closed; create a new one")

    def close(self) -> None:
        """Free the sessions and the KV cache; safe from any thread. Calls in flight on other
        threads finish first (a frame still being encoded is refused with OnsightError); a
        `narrate()` running elsewhere ends (its source is interrupted, and its own thread
        closes it); later calls raise OnsightError. From inside a call on
        this thread (a signal handler), the release happens when that call returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fail(
                list(self._questions),  # copied in one step: ask() appends without the lock
                _Closed("this Assistant was closed before the question was answered"),
            )
            narrating = self._narrating
            if narrating is not None:  # a narrate() waiting on a stalled stream ends now
                narrating[0].interrupt()  # thread-safe; the narrating thread closes it
            me = threading.get_ident()
            while any(t != me for t in self._inflight):
                self._idle.wait()
            inside = me in self._inflight
            if not inside:
                self._release()
        if narrating is not None and not inside:
            # its stage threads, also when its generator is left suspended by the caller
            narrating[1].close(timeout_s=2.0)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self.backend.close()
        self._stepper = None  # type: ignore[assignment]
        self._loop = None  # type: ignore[assignment]

    def __enter__(self) -> Assistant:
        self._check_open()  # `with` on a closed Assistant fails here, not at its first call
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
