"""The embedding API: `with Assistant("engines/demo") as a: for event in a.narrate(0): ...`.

Three verbs: `narrate(source)` iterates typed events, `ask(question)` queues a question for
the next frame boundary, `push(frame, timestamp)` feeds a frame from a camera you own.
Capture, preprocessing and the vision encoder run on their own threads, overlapped with the
LLM (onnxruntime releases the GIL); the LLM loop runs in the thread that iterates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onsight.runtime.backends import make_backend
from onsight.runtime.bundle import load_bundle
from onsight.runtime.errors import OnsightError
from onsight.runtime.events import (
    AnswerEvent,
    Event,
    NarrationEvent,
    SourceEvent,
    StatsEvent,
    WarningEvent,
)
from onsight.runtime.frames import Frame
from onsight.runtime.preprocess import letterbox
from onsight.runtime.stream_loop import FrameOutcome, Sampler, StreamLoop
from onsight.runtime.template import build_template_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssistantConfig:
    """How the assistant runs a bundle; every field has a sensible default."""

    backend: str = "auto"  # auto | onnxruntime | onnxruntime:cpu | onnxruntime:cuda | tensorrt
    fps: float | None = None  # sampling rate; None takes the bundle's default (e.g. 2)
    realtime: bool = True  # files: pace to the wall clock like a camera (live sources always are)
    max_new_tokens: int | None = None  # cap on one narration; None takes the bundle's
    temperature: float = 0.0  # 0 is greedy, as the reference
    threads: int | None = None  # onnxruntime intra-op threads; None lets it decide
    decode_workers: int = 1  # files without realtime: parallel keyframe-segment decoders
    skip_duplicate_frames: bool = False  # skip frames whose tokens barely changed
    duplicate_threshold: float = 0.995  # mean token cosine above which a frame is a duplicate
    prune_static_tokens: bool = False  # DyCoke-style: 2nd frame of each pair keeps changed tokens
    prune_ratio: float = 0.7  # DyCoke's K: share of that frame's tokens pruned
    stats_every: int = 10  # a StatsEvent every this many processed frames


class _Tokens:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


class _TimedStepper:
    """Wraps the stepper to time frame prefill and text decoding separately."""

    def __init__(self, inner):
        self.inner = inner
        self.prefill_ms = 0.0
        self.decode_ms = 0.0

    def text(self, ids, kind, group):
        t = time.perf_counter()
        out = self.inner.text(ids, kind, group)
        self.decode_ms += (time.perf_counter() - t) * 1e3
        return out

    def frame(self, ids, embeds, group, keep=None):
        t = time.perf_counter()
        if keep is None:  # wrapped steppers need not know about pruning
            out = self.inner.frame(ids, embeds, group)
        else:
            out = self.inner.frame(ids, embeds, group, keep)
        self.prefill_ms = (time.perf_counter() - t) * 1e3
        return out


class Assistant:
    """A bundle, a backend, a KV cache and the speak-or-stay-silent loop. Thread-safe."""

    def __init__(self, engine: str | Path, config: AssistantConfig | None = None):
        self.config = config or AssistantConfig()
        self.bundle = load_bundle(engine)
        self.backend = make_backend(self.bundle, self.config.backend, self.config.threads)
        log.info("bundle %s on %s", self.bundle.name, self.backend.name)
        self.tokens = _Tokens(self.bundle.tokenizer_path)
        gen = self.bundle.generation
        self.fps = float(self.config.fps or gen.get("fps", 2.0))
        self._stepper = _TimedStepper(self.backend.stepper())
        self._loop = StreamLoop(
            self._stepper,
            build_template_ids(self.tokens.tok, self.bundle.template),
            encode=self.tokens.encode,
            threshold=float(gen["threshold"]),
            max_new_tokens=int(self.config.max_new_tokens or gen["max_new_tokens"]),
            sampler=Sampler(temperature=self.config.temperature),
        )
        self._lock = threading.RLock()
        self._closed = False
        self._last_embeds: np.ndarray | None = None
        self._processed = 0
        self._skipped = 0
        self._captured = 0
        self._dropped = 0
        self._stage_ms: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._pruned = 0
        self._prune = self.config.prune_static_tokens and self._pruning_supported()

    def _pruning_supported(self) -> bool:
        from onsight.runtime.pruning import graph_accepts_pruned_frames

        sessions = getattr(self.backend, "sessions", None)
        if sessions is None:  # TensorRT plans are built with a frame-token range
            return True
        if graph_accepts_pruned_frames(sessions["frame_step"].get_inputs()):
            return True
        log.warning(
            "this bundle's frame step takes exactly N tokens; re-export it to use "
            "--prune-static (pruning is off)"
        )
        return False

    # ---- the three verbs ----

    def ask(self, question: str) -> None:
        """Queue a question; its AnswerEvent follows the next processed frame."""
        q = question.strip()
        if not q:
            raise OnsightError("ask(): the question is empty")
        self._loop.ask(q)  # deque.append is atomic

    def push(self, image: np.ndarray, timestamp: float | None = None) -> list[Event]:
        """Process one RGB uint8 frame (H, W, 3) now; returns the events it produced."""
        self._check_open()
        ts = time.monotonic() if timestamp is None else float(timestamp)
        frame = Frame(np.ascontiguousarray(image), ts, self._captured)
        self._captured += 1
        t = time.perf_counter()
        pixels = self._preprocess(frame)
        t1 = time.perf_counter()
        embeds = self.backend.encode(pixels[None])[0]
        self._stage_ms.update(preprocess=(t1 - t) * 1e3, vision=(time.perf_counter() - t1) * 1e3)
        return list(self._on_embeds(frame, embeds))

    def narrate(self, source, max_frames: int | None = None) -> Iterator[Event]:
        """Narrate a source (camera index, file, URL, pipeline, image folder, or an open
        capture Source); yields events until the source ends or max_frames are processed."""
        from onsight.runtime.capture import CaptureOptions, Pipeline, Source, Stage, open_source

        self._check_open()
        from onsight.runtime.synthetic.cli import resolve_source

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
        try:
            waited = time.perf_counter()
            for item in pipe.run(src):
                if isinstance(item, SourceEvent):
                    yield item
                    continue
                frame, embeds = item
                self._stage_ms.update(pipe.stage_ms())
                self._stage_ms["capture"] = (time.perf_counter() - waited) * 1e3
                st = src.stats()
                self._captured, self._dropped = st.frames_captured, st.frames_dropped
                yield from self._on_embeds(frame, embeds)
                done += 1
                if max_frames is not None and done >= max_frames:
                    break
                waited = time.perf_counter()
        finally:
            pipe.close()
            src.close()
        yield self.stats()

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
        return frame, self.backend.encode(pixels[None])[0]

    def _is_duplicate(self, embeds: np.ndarray) -> bool:
        if (
            not self.config.skip_duplicate_frames
            or self._last_embeds is None
            or self._loop.questions
        ):
            return False
        a, b = embeds, self._last_embeds
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-6)
        return float(cos.mean()) >= self.config.duplicate_threshold

    def _on_embeds(self, frame: Frame, embeds: np.ndarray) -> Iterator[Event]:
        with self._lock:
            if self._is_duplicate(embeds):
                self._skipped += 1
                return
            keep = None
            if self._prune:
                from onsight.runtime.pruning import dycoke_keep

                keep = dycoke_keep(
                    embeds,
                    self._last_embeds,
                    self._processed,
                    self.bundle.layout.k,
                    self.config.prune_ratio,
                )
                if keep is not None:
                    self._pruned += embeds.shape[0] - len(keep)
            self._last_embeds = embeds
            self._stepper.decode_ms = 0.0
            try:
                out: FrameOutcome = self._loop.on_frame(embeds, keep)
            except Exception as e:
                raise OnsightError(f"inference failed at frame {frame.index}: {e}") from e
            self._processed += 1
            self._stage_ms.update(prefill=self._stepper.prefill_ms, decode=self._stepper.decode_ms)
            events: list[Event] = []
            if out.speak and out.narration:
                events.append(
                    NarrationEvent(self.tokens.decode(out.narration), frame.index, frame.timestamp)
                )
            for q, ids in out.answers:
                events.append(AnswerEvent(q, self.tokens.decode(ids), frame.index, frame.timestamp))
            if self._processed % max(1, self.config.stats_every) == 0:
                events.append(self.stats())
        yield from events

    def stats(self) -> StatsEvent:
        self._check_open()
        cache = self._stepper.inner.cache
        elapsed = max(1e-9, time.perf_counter() - self._t0)
        return StatsEvent(
            frames_captured=max(self._captured, self._processed),
            frames_processed=self._processed,
            frames_dropped=self._dropped + self._skipped,
            stage_ms={k: round(v, 3) for k, v in self._stage_ms.items()},
            kv_fill=round(cache.fill(), 4),
            kv_frames_fit=cache.frames_fit(),
            evictions=cache.evictions,
            fps_processed=round(self._processed / elapsed, 3),
            backend=self.backend.name,
            tokens_pruned=self._pruned,
        )

    def warn(self, message: str) -> WarningEvent:
        log.warning("%s", message)
        return WarningEvent(message)

    def reset(self) -> None:
        """Forget the stream (empty the KV cache); the next frame starts a new one."""
        with self._lock:
            self._stepper.inner.reset()
            self._loop = StreamLoop(
                self._stepper,
                self._loop.t,
                self._loop.encode,
                self._loop.threshold,
                self._loop.max_new_tokens,
                self._loop.sample,
            )
            self._last_embeds = None

    def _check_open(self) -> None:
        if self._closed:
            raise OnsightError("this Assistant is closed; create a new one")

    def close(self) -> None:
        """Free the sessions and the KV cache."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.backend.close()
            self._stepper = None  # type: ignore[assignment]
            self._loop = None  # type: ignore[assignment]

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
