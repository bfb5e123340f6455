"""The narration log: what the model said, answers set apart, source events in grey."""

from __future__ import annotations

import unicodedata
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.segment import Segment
from rich.text import Text
from textual import events
from textual.widgets import RichLog

from onsight.runtime.events import AnswerEvent, NarrationEvent, SourceEvent

EntryKind = Literal["narration", "question", "answer", "source", "warning", "note"]

MAX_LINES = 5000  # bound memory on a narrator left running for days
REWRAP_ROWS = 1000  # rows re-laid out after a width change (~0.2 s); older ones leave the view
REWRAP_DELAY_S = 0.15  # a terminal being dragged sends many resizes: re-lay out once at the end
STAMP_GAP = 2


@dataclass(frozen=True)
class LogEntry:
    """One line as written, kept in plain text for tests and copy-out."""

    kind: EntryKind
    stamp: str
    text: str
    row: Row | None = field(default=None, compare=False, repr=False)  # as drawn, to re-wrap


class Row:
    """One log row: the stamp, then the text wrapped in a hanging indent beside it.

    Cheaper than a two-column Table (which measures every cell): the log re-lays out its
    rows whenever its width changes, and a Table per row made that take seconds."""

    def __init__(self, stamp: Text, body: Text) -> None:
        self.stamp, self.body = stamp, body

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        indent = self.stamp.cell_len + STAMP_GAP
        return Measurement(min(indent + 1, options.max_width), options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        indent = self.stamp.cell_len + STAMP_GAP
        lines = self.body.wrap(console, max(1, options.max_width - indent), overflow="fold")
        first = [*self.stamp.render(console), Segment(" " * STAMP_GAP)]
        hang = [Segment(" " * indent)]
        for i, line in enumerate(lines or [Text()]):
            yield from first if i == 0 else hang
            yield from line.render(console)
            yield Segment.line()


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
    """A RichLog of two-column rows (time, text) so wrapped text stays aligned.

    RichLog draws a row once, at the width it had then; after the terminal is resized the
    newest REWRAP_ROWS rows are drawn again at the new width (shrinking no longer crops
    text, growing no longer leaves rows wrapped narrow)."""

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
        self._laid_out_width: int | None = None  # content width the rows were drawn at
        self._rewrap_timer = None

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
        row = Row(Text(stamp, self.get_component_rich_style("log--stamp", partial=True)), body)
        self.entries.append(LogEntry(kind, stamp, body.plain, row))
        self.write(row, expand=True)

    # ---- re-layout on resize ----

    def on_resize(self, event: events.Resize) -> None:
        # RichLog's own handler (the first size) runs too: Textual calls both.
        width = self.scrollable_content_region.width
        if self._laid_out_width is None:
            self._laid_out_width = width
        elif width != self._laid_out_width:
            if self._rewrap_timer is not None:
                self._rewrap_timer.stop()
            self._rewrap_timer = self.set_timer(REWRAP_DELAY_S, self.rewrap)

    def rewrap(self) -> None:
        """Draw the newest rows again at the current width."""
        self._rewrap_timer = None
        self._laid_out_width = self.scrollable_content_region.width
        rows = [e.row for e in islice(reversed(self.entries), REWRAP_ROWS) if e.row is not None]
        self.clear()
        for row in reversed(rows):
            self.write(row, expand=True, scroll_end=False)
        self.scroll_end(animate=False, immediate=True)

    COMPONENT_CLASSES = {"log--stamp", "log--question", "log--answer", "log--quiet", "log--warning"}
