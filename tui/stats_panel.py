"""Stats panel: rates, per-stage latency, KV cache fill, keep ratio, backend, drops."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from onsight.runtime.events import StatsEvent

from .messages import EngineInfo
from .narration_log import clean_text

STAGES = ("capture", "preprocess", "vision", "prefill", "decode")  # pipeline order
STAGE_LABELS = {"preprocess": "pre"}  # short names keep the latency row to two lines
BAR_WIDTH = 16
KEY_WIDTH = 9  # "processed"


def fill_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """'█████░░░░' for 0..1, in eighths so small changes are visible."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part else ""
    return ("█" * full + partial).ljust(width, "░")[:width]


def _rate(count: int, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


class StatsPanel(Static):
    """Holds the latest facts and redraws itself from them; fed by the app's handlers."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.info: EngineInfo | None = None
        self.stats: StatsEvent | None = None
        self.source = "-"
        self.source_status = "starting"
        self.paused = False
        self.capture_fps: float | None = None
        self.process_fps: float | None = None

    def set_engine(self, info: EngineInfo) -> None:
        self.info = info
        self._redraw()

    def set_source(self, name: str, status: str) -> None:
        self.source, self.source_status = name, status
        self._redraw()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._redraw()

    def set_stats(self, event: StatsEvent) -> None:
        prev = self.stats
        # Rates from two consecutive events (their own wall_time), not from our clock: they
        # measure the runtime, not how late the message reached the UI.
        if prev is not None and event.wall_time > prev.wall_time:
            dt = event.wall_time - prev.wall_time
            self.capture_fps = _rate(event.frames_captured - prev.frames_captured, dt)
            self.process_fps = _rate(event.frames_processed - prev.frames_processed, dt)
        elif self.process_fps is None:
            self.process_fps = event.fps_processed
        self.stats = event
        self._redraw()

    def on_mount(self) -> None:
        self._redraw()

    def on_resize(self) -> None:
        self._redraw()  # the latency row packs to the width

    def _redraw(self) -> None:
        if self.is_mounted:
            self.update(self._render_stats())

    def _render_stats(self) -> RenderableType:
        key = self.get_component_rich_style("stats--key", partial=True)
        dim = self.get_component_rich_style("stats--dim", partial=True)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style=key, no_wrap=True, width=KEY_WIDTH)
        grid.add_column(overflow="fold")

        state = "paused" if self.paused else self.source_status
        grid.add_row("source", Text.assemble(clean_text(self.source), (f" · {state}", dim)))
        info, st = self.info, self.stats
        if info is None:
            grid.add_row("engine", Text("loading ...", dim))
        else:
            keep = "-" if info.keep_ratio is None else f"{info.keep_ratio:.2f}"
            grid.add_row("engine", Text.assemble(clean_text(info.name), (f" · keep {keep}", dim)))
            backend = st.backend if st is not None else info.backend
            grid.add_row("backend", Text.assemble(backend, (f" · {info.device}", dim)))
        grid.add_row("captured", Text.assemble(_fps(self.capture_fps), (" frames/s", dim)))
        if st is None:
            grid.add_row("processed", Text.assemble(_fps(self.process_fps), (" frames/s", dim)))
            return grid
        grid.add_row(
            "processed",
            Text.assemble(
                _fps(self.process_fps),
                (" frames/s · ", dim),
                str(st.frames_processed),
                (" frames", dim),
            ),
        )
        grid.add_row("dropped", str(st.frames_dropped))
        grid.add_row(
            "kv cache",
            Text.assemble(
                (fill_bar(st.kv_fill), self.get_component_rich_style("stats--bar", partial=True)),
                f" {st.kv_fill:4.0%}",
            ),
        )
        grid.add_row(
            "",
            Text.assemble(
                str(st.kv_frames_fit),
                (" frames fit · ", dim),
                str(st.evictions),
                (" evicted", dim),
            ),
        )
        names = [s for s in STAGES if s in st.stage_ms] + sorted(set(st.stage_ms) - set(STAGES))
        pairs = [f"{STAGE_LABELS.get(n, n)} {st.stage_ms[n]:.1f}" for n in names] + ["ms"]
        # Pack whole "name value" pairs per line: wrapping must never split a pair.
        room = max(12, self.size.width - KEY_WIDTH - 1)
        latency, used = Text(), 0
        for pair in pairs:
            gap = 0 if used == 0 else (2 if used + 2 + len(pair) <= room else -1)
            if gap < 0:
                latency.append("\n")
                gap, used = 0, 0
            name, _, value = pair.rpartition(" ")
            latency.append(" " * gap + (f"{name} " if name else ""), dim)
            latency.append(value, dim if pair == "ms" else "")
            used += gap + len(pair)
        grid.add_row("latency", latency)
        return grid

    COMPONENT_CLASSES = {"stats--key", "stats--dim", "stats--bar"}


def _fps(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
