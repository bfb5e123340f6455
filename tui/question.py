"""The question box: what it takes (a token count against the bundle's budget as you type)
and its own keys in the footer (Enter sends, Esc goes back to the log)."""

from __future__ import annotations

from collections.abc import Callable

from textual.binding import Binding
from textual.widgets import Input

PLACEHOLDER = "press / to ask a question"

TokenCounter = Callable[[str], int]


class QuestionInput(Input):
    """An Input that knows the engine's question budget (once the engine is loaded).

    While it has focus every printable key is text, so the footer would go blank: these
    bindings put "Send" and "Back" there instead."""

    BINDINGS = [
        Binding("enter", "submit", "Send"),
        Binding("escape", "app.leave_question", "Back to the log", key_display="esc"),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        # select_on_focus off: a refused question stays to be shortened, not to be replaced
        # by the next key; and typing on the log moves its first letter here before focus.
        super().__init__(placeholder=PLACEHOLDER, id=id, select_on_focus=False)
        self._count: TokenCounter | None = None
        self.budget: int | None = None

    def set_budget(self, count: TokenCounter, budget: int) -> None:
        """count(text) -> tokens, as the engine counts a question; budget: the most it takes."""
        self._count, self.budget = count, budget
        self._show_count(self.value)

    def tokens(self, text: str) -> int | None:
        if self._count is None or not text.strip():
            return None
        try:
            return self._count(text.strip())
        except Exception:  # a counter that fails must not take typing down with it
            return None

    def watch_value(self, value: str) -> None:  # Input's own _watch_value runs too
        self._show_count(value)

    def _show_count(self, value: str) -> None:
        n = self.tokens(value)
        over = n is not None and self.budget is not None and n > self.budget
        self.set_class(over, "-too-long")
        if n is None or self.budget is None:
            self.border_subtitle = ""
        else:
            self.border_subtitle = f"{n}/{self.budget} tokens" + (": too long" if over else "")
