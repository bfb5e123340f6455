"""What `Assistant.ask()` takes and gives back: the longest question a bundle's KV cache keeps
through any eviction while it is answered, the check of a question against that limit, and the
queued question that carries the Future its answer completes."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError

from onsight.runtime.bundle import Bundle
from onsight.runtime.errors import OnsightError
from onsight.runtime.stream_loop import TemplateIds


def question_budget(bundle: Bundle, t: TemplateIds, max_new_tokens: int) -> int:
    """The longest question (tokens) whose turn survives any eviction while it is answered.

    An eviction keeps the system prompt and the newest turn (the one being decoded) and
    brings every layer under (1 - free_fraction) of its capacity; the frame before the
    question, the question's turn and the longest answer but its last token must fit there
    in every layer (text is stored in full in routed layers too).
    """
    lay = bundle.layout
    keep = 1.0 - bundle.policy.free_fraction
    room = min(
        int(lay.capacity(i) * keep) - (lay.k if i in lay.routed else lay.tokens_per_frame)
        for i in range(lay.num_layers)
    )
    before = 2 + len(t.stream_open)  # fed with the frame: a previous turn's EOS, "\n["
    turn = len(t.stream_close) + len(t.user_prefix) + len(t.assistant_prefix)
    return max(0, room - len(t.sink) - before - turn - (max_new_tokens - 1))


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_question(
    question: object, encode: Callable[[str], list[int]], limit: int, max_new_tokens: int
) -> str:
    """The question as ask() queues it (stripped; lone surrogates, e.g. a command line's
    non-UTF-8 bytes, become U+FFFD, one per undecodable byte). Raises
    OnsightError for one that is not a str, is empty, or is longer than `limit` tokens
    (`question_budget`)."""
    if not isinstance(question, str):
        raise OnsightError(f"ask(): the question must be a str, got {type(question).__name__}")
    q = _SURROGATE.sub("\ufffd", question).strip()
    if not q:
        raise OnsightError("ask(): the question is empty")
    n = len(encode(q))
    if n > limit:
        raise OnsightError(
            f"the question is {n} tokens; this bundle's KV cache holds at most {limit} "
            f"beside an answer of up to {max_new_tokens} tokens: ask a shorter "
            "question (or lower --max-new-tokens, or re-export with a larger --kv-capacity)"
        )
    return q


class Asked(str):
    """A queued question: the text the stream loop reads (it is a str), and `future`, the
    `Future[AnswerEvent]` that `ask()` returned, completed when the answer is made."""

    future: Future

    def __new__(cls, text: str) -> Asked:
        q = super().__new__(cls, text)
        q.future = Future()
        return q


def settle(question: str, answer: object) -> None:
    """Complete the Future of a question `ask()` queued (a plain str has none). A Future the
    caller cancelled stays cancelled."""
    future = getattr(question, "future", None)
    if future is not None:
        try:
            future.set_result(answer)
        except InvalidStateError:  # cancelled by the caller (or already settled)
            pass


def fail(questions: Iterable[str], error: BaseException) -> None:
    """Fail the Futures of questions that will not be answered (closed, or answering failed)."""
    for q in questions:
        future = getattr(q, "future", None)
        if future is not None:
            try:
                future.set_exception(error)
            except InvalidStateError:
                pass
