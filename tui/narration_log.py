"""The narration log: what the model said, answers set apart, source events in grey."""

from __future__ import annotations

import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import Literal

from rich.table import Table
from rich.text import Text
from textual.widgets import RichLog

from onsight.runtime.events import AnswerEvent, NarrationEvent, SourceEvent

EntryKind = Literal["narration", "question", "answer", "source", "warning", "note"]

MAX_LINES = 5000  # bound memory on a narrator left running for days


@dataclass(frozen=True)
class LogEntry:
    """One line as written, kept in plain text for tests and copy-out."""

    kind: EntryKind
    stamp: str
    text: str


def clean_text(text: str) -> str:
    """Model output made safe to draw: control and format characters become U+FFFD.

    A random or badly quantised model can emit backspaces, escapes and bidi overrides;
    drawn raw they would move the cursor or corrupt the screen. Rich markup is never parsed
    (we build Text objects), so brackets are literal already.
    """
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n":
            out.append(" ")
        elif cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out).strip()


def format_stamp(seconds: float | None) -> str:
    """Stream time as m:ss.s (h:mm:ss past an hour); '--:--.-' before the first frame."""
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN, or before start
        return "--:--.-"
    if seconds >= 3600:
        h, rem = divmod(int(seconds), 3600)
        m, s = divmod(rem, 60)
        return f"{h}:{m:02d}:{s:02d}"
    m, s = divmod(seconds, 60)
    return f"{int(m):02d}:{s:04.1f}"


class NarrationLog(RichLog):
    """A RichLog of two-column rows (time, text) so wrapped text stays aligned."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id,
            wrap=True,
            markup=False,
            highlight=False,
            auto_scroll=True,
            max_lines=MAX_LINES,
            min_width=20,  # the default 78 would add a horizontal scrollbar on a narrow log
        )
        self.entries: deque[LogEntry] = deque(maxlen=MAX_LINES)
        self.can_focus = True  # focused by default so single-key bindings work

    # ---- one method per kind of line ----

    def add_narration(self, event: NarrationEvent) -> None:
        text = clean_text(event.text)
        if text:  # a model that "speaks" only special tokens says nothing worth a line
            self._add("narration", format_stamp(event.frame_timestamp), Text(text))

    def add_question(self, stamp: float | None, question: str) -> None:
        body = Text.assemble(("you › ", "bold"), clean_text(question))
        self._add("question", format_stamp(stamp), body, "question")

    def add_answer(self, event: AnswerEvent) -> None:
        body = Text.assemble(("onsight › ", "bold"), clean_text(event.text) or "(no answer)")
        self._add("answer", format_stamp(event.frame_timestamp), body, "answer")

    def add_source(self, stamp: float | None, event: SourceEvent) -> None:
        text = f"· {event.status}"
        if event.message:
            text += f": {clean_text(event.message)}"
        self._add("source", format_stamp(stamp), Text(text), "quiet")

    def add_note(self, stamp: float | None, text: str) -> None:
        self._add("note", format_stamp(stamp), Text(f"· {clean_text(text)}"), "quiet")

    def add_warning(self, stamp: float | None, text: str) -> None:
        self._add("warning", format_stamp(stamp), Text(f"! {clean_text(text)}"), "warning")

    def plain(self, kind: EntryKind | None = None) -> list[str]:
        """Texts written so far (optionally one kind), oldest first."""
        return [e.text for e in self.entries if kind is None or e.kind == kind]

    def _add(self, kind: EntryKind, stamp: str, body: Text, component: str = "") -> None:
        if component:
            # Colours live in the .tcss (component classes), not in Python.
            body.stylize(self.get_component_rich_style(f"log--{component}", partial=True))
        row = Table.grid(padding=(0, 2), expand=True)
        row.add_column(
            no_wrap=True, style=self.get_component_rich_style("log--stamp", partial=True)
        )
        row.add_column(ratio=1, overflow="fold")
        row.add_row(stamp, body)
        self.entries.append(LogEntry(kind, stamp, body.plain))
        self.write(row, expand=True)

    COMPONENT_CLASSES = {"log--stamp", "log--question", "log--answer", "log--quiet", "log--warning"}
