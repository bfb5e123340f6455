"""Stats panel: rates, per-stage latency, KV cache fill, keep ratio, backend, drops."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from onsight.runtime.events import StatsEvent

from .messages import EngineInfo
from .narration_log import clean_text

STAGES = ("preprocess", "vision", "prefill", "decode")  # pipeline order ("capture": idle)
STAGE_LABELS = {"preprocess": "pre"}  # short names keep the timings to two lines
BAR_WIDTH = 16
KEY_WIDTH = 9  # "processed", "evictions"


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
        self.engine_status = "loading ..."  # until the engine is loaded (or fails)
        self.paused = False
        self.capture_fps: float | None = None
        self.process_fps: float | None = None
        self._rate_base: StatsEvent | None = None  # the event rates are measured from

    def set_engine(self, info: EngineInfo) -> None:
        self.info = info
        self._redraw()

    def set_source(self, name: str, status: str) -> None:
        self.source, self.source_status = name, status
        self._redraw()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.clear_rates()

    def set_engine_failed(self) -> None:
        self.engine_status = "failed"
        self._redraw()

    def clear_rates(self) -> None:
        """Paused or ended: no rate is current, and the next one must not span the gap."""
        self.capture_fps = self.process_fps = None
        self._rate_base = None
        self._redraw()

    def set_stats(self, event: StatsEvent) -> None:
        prev = self._rate_base
        self._rate_base = event
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

    def summary(self) -> str:
        """One short line for when the panel is hidden (a small terminal): rate, KV fill,
        drops."""
        st = self.stats
        parts = [] if self.process_fps is None else [f"{self.process_fps:.1f} frames/s"]
        if st is not None:
            parts.append(f"kv {st.kv_fill:.0%}")
            if st.frames_dropped:
                parts.append(f"{st.frames_dropped} dropped")
        return " · ".join(parts)

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
            grid.add_row("engine", Text(self.engine_status, dim))
        else:
            keep = "-" if info.keep_ratio is None else f"{info.keep_ratio:.2f}"
            grid.add_row("engine", Text.assemble(clean_text(info.name), (f" · keep {keep}", dim)))
            backend = st.backend if st is not None else info.backend
            # "onnxruntime:cpu · cpu" says cpu twice: the device only when the name lacks it
            device = "" if info.device in backend else f" · {info.device}"
            grid.add_row("backend", Text.assemble(backend, (device, dim)))
        # What the source delivers, then what the model keeps up with (of its sampling rate).
        grid.add_row("input", Text.assemble(_fps(self.capture_fps), (" frames/s", dim)))
        target = info.fps if info is not None else None
        of = "" if target is None else f" of {target:g}"
        grid.add_row("processed", Text.assemble(_fps(self.process_fps), (f"{of} frames/s", dim)))
        if st is None:
            return grid
        grid.add_row(
            "frames",
            Text.assemble(
                str(st.frames_processed),
                (" seen · ", dim),
                str(st.frames_dropped),
                (" dropped", dim),
                *((" · ", dim), str(st.frames_skipped), (" alike, skipped", dim))
                if st.frames_skipped
                else (),
            ),
        )
        bar_style = self.get_component_rich_style("stats--bar", partial=True)
        grid.add_row(
            "kv cache", Text.assemble((fill_bar(st.kv_fill), bar_style), f" {st.kv_fill:4.0%}")
        )
        grid.add_row("", Text.assemble(("holds ", dim), str(st.kv_frames_fit), (" frames", dim)))
        grid.add_row("evictions", str(st.evictions))
        grid.add_row("ms/frame", self._timings(st, dim))
        return grid

    def _timings(self, st: StatsEvent, dim) -> Text:
        """Where the last frame's time went, as whole "name value" pairs packed per line.
        "capture" is the time the model waited for the next frame, so it is shown last, as
        "idle": a live source at 2 frames/s leaves ~490 ms idle, not a 490 ms capture."""
        ms = st.stage_ms
        names = [s for s in STAGES if s in ms] + sorted(set(ms) - set(STAGES) - {"capture"})
        pairs = [(STAGE_LABELS.get(n, n), ms[n]) for n in names]
        if "capture" in ms:
            pairs.append(("idle", ms["capture"]))
        room = max(12, self.size.width - KEY_WIDTH - 1)
        out, used = Text(), 0
        for name, value in pairs:
            number = f"{value:.1f}" if value < 100 else f"{value:.0f}"
            width = len(name) + 1 + len(number)
            if used and used + 2 + width > room:
                out.append("\n")
                used = 0
            out.append(("  " if used else "") + f"{name} ", dim)
            out.append(number)
            used += (2 if used else 0) + width
        return out

    COMPONENT_CLASSES = {"stats--key", "stats--dim", "stats--bar"}


def _fps(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
