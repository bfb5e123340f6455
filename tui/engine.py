"""What the app drives: the engine it narrates with (the Assistant's verbs, or a test's fake),
a summary of it for the header, and the tapped source that feeds the preview and pauses."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from onsight.runtime.capture import Source, SourceKind, classify_spec
from onsight.runtime.errors import SourceError
from onsight.runtime.events import Event, SourceEvent, StatsEvent
from onsight.runtime.frames import Frame

from .messages import EngineInfo

GATE_POLL_S = 0.1  # a paused thread re-checks for shutdown this often


class Engine(Protocol):
    """What the app needs from an engine: the Assistant's verbs (tests pass a fake).

    Used when present: `answer_now()` (questions while paused or after the end),
    `max_question_tokens()` with `tokens.encode` (the question box's token count)."""

    def narrate(self, source: Any, max_frames: int | None = None) -> Iterator[Event]: ...

    def ask(self, question: str) -> None: ...

    def stats(self) -> StatsEvent: ...

    def close(self) -> None: ...


EngineFactory = Callable[[], Engine]


def question_budget(engine: Engine) -> tuple[Callable[[str], int], int] | None:
    """(count tokens of a question, the most ask() takes) when the engine says (the
    Assistant's `tokens.encode` and `max_question_tokens()`); None for one that does not."""
    encode = getattr(getattr(engine, "tokens", None), "encode", None)
    limit = getattr(engine, "max_question_tokens", None)
    if not callable(encode) or not callable(limit):
        return None
    try:
        budget = int(limit())
    except Exception:
        return None
    return (lambda text: len(encode(text))), budget


SourceOpener = Callable[[str, "float | None"], Source]  # (spec, fps) -> an open Source


def describe_engine(engine: Engine, fps: float | None) -> EngineInfo:
    """Name, backend, device and keep ratio from the Assistant's public attributes."""
    bundle = getattr(engine, "bundle", None)
    backend = getattr(engine, "backend", None)
    manifest: dict[str, Any] = getattr(bundle, "manifest", None) or {}
    backend_name = str(getattr(backend, "name", "?"))
    device = getattr(backend, "device", None)
    if device is None:  # TensorRT always runs on the GPU; onnxruntime names its provider
        device = (
            "cuda"
            if backend_name.startswith("tensorrt") or "cuda" in backend_name
            else ("cpu" if "cpu" in backend_name else "?")
        )
    keep = (manifest.get("mod") or {}).get("keep_ratio")
    return EngineInfo(
        name=str(getattr(bundle, "name", "engine")),
        backend=backend_name,
        device=str(device),
        keep_ratio=float(keep) if keep is not None else None,
        fps=fps,
    )


def is_camera(spec: str) -> bool:
    """Whether `spec` names a camera (a missing one gets the demo video offered instead)."""
    try:
        return classify_spec(spec)[0] is SourceKind.CAMERA
    except SourceError:
        return False


class TappedSource(Source):
    """Wraps an open Source: remembers the newest frame for the preview and holds back
    while paused. The tap is one attribute store per frame, so capture pays nothing."""

    def __init__(self, inner: Source, flowing: threading.Event) -> None:
        super().__init__(inner.name, inner.kind)
        self.inner = inner
        self.latest: Frame | None = None
        self._flowing = flowing  # set = flowing, clear = paused
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[Frame | SourceEvent]:
        items = iter(self.inner)
        while not self._closed.is_set():
            # Wait *before* pulling: a live source keeps only its newest frame meanwhile,
            # so resuming narrates the present, not the frame from when we paused.
            while not self._flowing.wait(GATE_POLL_S):
                if self._closed.is_set():
                    return
            try:
                item = next(items)
            except StopIteration:
                return
            if isinstance(item, Frame):
                self.latest = item
            yield item

    def close(self) -> None:
        self._closed.set()
        self.inner.close()

    def interrupt(self) -> None:
        self._closed.set()
        self.inner.interrupt()

    def stats(self):  # the Assistant reads capture counters through us
        return self.inner.stats()
