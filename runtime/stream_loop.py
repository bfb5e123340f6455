"""VideoLLM-online's streaming control flow, independent of the array library.

Per frame: prefill the text before it and the frame; decide speak-or-stay-silent from
p(interval token) and the threshold; narrate greedily until EOS; answer questions at the
frame boundary. The PyTorch reference and the runtime's engine plug in a `Stepper` that owns
the KV cache, so both follow exactly this logic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from onsight.runtime.kv_policy import FRAME, SINK, TURN


class Stepper(Protocol):
    """Runs decoder steps and keeps the KV cache; returns last-position logits (vocab,)."""

    def text(self, ids: list[int], kind: int, group: int) -> np.ndarray: ...

    def frame(self, ids: list[int], embeds: np.ndarray, group: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TemplateIds:
    """Token ids of the template pieces (each tokenised on its own, identically everywhere)."""

    sink: tuple[int, ...]  # bos + system prompt + "\n"
    stream_open: tuple[int, ...]  # "\n[" before the first frame of a run
    stream_close: tuple[int, ...]  # "]" when a turn interrupts the frames
    user_prefix: tuple[int, ...]  # "\nUser: "
    assistant_prefix: tuple[int, ...]  # "\nAssistant:"
    interval_id: int  # "," between silent frames
    eos_id: int  # ends a turn


def decide(logits: np.ndarray, interval_id: int, threshold: float) -> tuple[bool, float]:
    """VideoLLM-online's rule: zero p(interval) when below threshold, then argmax.

    Returns (speak, p_interval).
    """
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    p_interval = float(p[interval_id])
    if p_interval < threshold:
        p[interval_id] = 0.0
    return int(np.argmax(p)) != interval_id, p_interval


@dataclass
class Sampler:
    """Greedy at temperature 0 (the reference's behaviour); seeded sampling otherwise."""

    temperature: float = 0.0  # 0 means greedy
    seed: int = 0  # for temperature > 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        p = np.exp(x - x.max())
        return int(self._rng.choice(len(p), p=p / p.sum()))


@dataclass
class FrameOutcome:
    """What happened at one frame."""

    speak: bool
    p_interval: float
    narration: list[int] = field(default_factory=list)  # token ids, EOS excluded
    answers: list[tuple[str, list[int]]] = field(default_factory=list)  # (question, ids)


class StreamLoop:
    """The speak-or-stay-silent loop over a Stepper."""

    def __init__(
        self,
        stepper: Stepper,
        template: TemplateIds,
        encode: Callable[[str], list[int]],
        threshold: float,
        max_new_tokens: int = 100,
        sampler: Sampler | None = None,
        questions: deque[str] | None = None,
    ):
        self.stepper = stepper
        self.t = template
        self.encode = encode
        self.threshold = threshold
        self.max_new_tokens = max_new_tokens
        self.sample = sampler or Sampler()
        # pending questions; an owner may pass its own deque to keep them across loops
        self.questions: deque[str] = deque() if questions is None else questions
        # the questions the last on_frame()/answer_pending() took from `questions` (also
        # those asked while it ran): lost with it if it raised
        self.taken: list[str] = []
        self._groups = 0
        self._pending: list[int] = []
        self.frames_seen = 0
        self.started = False

    def _group(self) -> int:
        self._groups += 1
        return self._groups - 1

    def start(self) -> None:
        """Prefill the system prompt (the attention sink)."""
        self.stepper.text(list(self.t.sink), SINK, self._group())
        self._pending = list(self.t.stream_open)
        self.started = True

    def ask(self, question: str) -> None:
        """Queue a question; it is injected at the next frame boundary."""
        self.questions.append(question)

    def on_frame(self, embeds: np.ndarray, keep: np.ndarray | None = None) -> FrameOutcome:
        """One frame's vision tokens (N, hidden) through prefill, decision and any turns;
        `keep` restricts the prefill to those token indices (training-free pruning)."""
        self.taken = []
        if not self.started:
            self.start()
        if keep is None:
            logits = self.stepper.frame(self._pending, embeds, self._group())
        else:
            logits = self.stepper.frame(self._pending, embeds, self._group(), keep)
        self.frames_seen += 1
        speak, p_interval = decide(logits, self.t.interval_id, self.threshold)
        out = FrameOutcome(speak=speak, p_interval=p_interval)
        tail: list[int] = []
        if speak:
            out.narration, tail = self.generate(list(self.t.stream_close + self.t.assistant_prefix))
        out.answers, tail = self._answer_questions(tail, closed=speak)
        closed = speak or bool(out.answers)
        self._pending = tail + list(self.t.stream_open) if closed else [self.t.interval_id]
        return out

    def _answer_questions(
        self, tail: list[int], closed: bool
    ) -> tuple[list[tuple[str, list[int]]], list[int]]:
        """Answer every queued question in turn. `tail`: tokens a finished turn left to
        feed; `closed`: whether the frame stream was already closed by a turn."""
        answers: list[tuple[str, list[int]]] = []
        while self.questions:
            q = self.questions.popleft()
            self.taken.append(q)
            prefix = tail + ([] if closed else list(self.t.stream_close))
            prefix += list(self.t.user_prefix) + self.encode(q) + list(self.t.assistant_prefix)
            answer, tail = self.generate(prefix)
            answers.append((q, answer))
            closed = True
        return answers, tail

    def answer_pending(self) -> list[tuple[str, list[int]]]:
        """Answer the queued questions now, between frames (after a file ended, say), with
        the turns a frame boundary would give them; none before the first frame."""
        self.taken = []
        if self.frames_seen == 0 or not self.questions:
            return []
        t = self.t
        silent = self._pending == [t.interval_id]  # the stream is open: close it first
        tail = [] if silent else self._pending[: len(self._pending) - len(t.stream_open)]
        answers, tail = self._answer_questions(tail, closed=not silent)
        self._pending = tail + list(t.stream_open)
        return answers

    def generate(self, prefix: list[int]) -> tuple[list[int], list[int]]:
        """Feed `prefix`, then decode until EOS. Returns (tokens, tokens still to be fed)."""
        group = self._group()
        logits = self.stepper.text(prefix, TURN, group)
        out: list[int] = []
        while True:
            tok = self.sample(logits)
            if tok == self.t.eos_id:
                return out, [self.t.eos_id]
            out.append(tok)
            if len(out) >= self.max_new_tokens:
                return out, [tok, self.t.eos_id]
            logits = self.stepper.text([tok], TURN, group)


__all__ = [
    "FRAME",
    "SINK",
    "TURN",
    "FrameOutcome",
    "Sampler",
    "StreamLoop",
    "Stepper",
    "TemplateIds",
    "decide",
]
