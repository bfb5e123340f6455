"""What `Assistant.ask()` takes: the longest question a bundle's KV cache keeps through any
eviction while it is answered, and the check of a question against that limit."""

from __future__ import annotations

from collections.abc import Callable

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


def check_question(
    question: object, encode: Callable[[str], list[int]], limit: int, max_new_tokens: int
) -> str:
    """The question as ask() queues it (stripped). Raises OnsightError for one that is not a
    str, is empty, or is longer than `limit` tokens (`question_budget`)."""
    if not isinstance(question, str):
        raise OnsightError(f"ask(): the question must be a str, got {type(question).__name__}")
    q = question.strip()
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
