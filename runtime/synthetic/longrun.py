"""Does narration hold up over hours in bounded memory? A long synthetic stream, run as fast
as possible, scored in its first and last minutes, with resident memory sampled throughout.
The last window is also narrated by an assistant started fresh there: the same score means
a drop is the stream's content, not the runtime's state.

    python -m onsight.runtime.synthetic.longrun --engine engines/demo --hours 2 --out longrun.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from onsight.runtime.assistant import Assistant, AssistantConfig
from onsight.runtime.events import NarrationEvent
from onsight.runtime.files import write_text_atomic
from onsight.runtime.synthetic.metrics import score_narrations
from onsight.runtime.synthetic.world import WorldConfig, iter_stream

log = logging.getLogger(__name__)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def long_run(engine: str, hours: float, window_min: float = 10.0, seed: int = 424242) -> dict:
    cfg = WorldConfig()
    n = int(hours * 3600 * cfg.fps)
    window = window_min * 60
    end = n / cfg.fps
    preds: list[tuple[float, str]] = []
    # The control: a second assistant that starts fresh at the last window. If its score there
    # equals the long-running one's, a lower last window is the stream's content, not state
    # the runtime accumulated over hours.
    fresh_preds: list[tuple[float, str]] = []
    events = []
    memory: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    fresh_wall = 0.0
    quiet = AssistantConfig(stats_every=10**9)
    with Assistant(engine, quiet) as a, Assistant(engine, quiet) as fresh:
        for step in iter_stream(seed, cfg, n):
            events.extend(step.events)
            t = step.state.time_s
            for ev in a.push(step.image, t):
                if isinstance(ev, NarrationEvent):
                    preds.append((ev.frame_timestamp, ev.text))
            if t >= end - window:
                t1 = time.perf_counter()
                for ev in fresh.push(step.image, t):
                    if isinstance(ev, NarrationEvent):
                        fresh_preds.append((ev.frame_timestamp, ev.text))
                fresh_wall += time.perf_counter() - t1
            if step.state.index % 600 == 0:
                memory.append((step.state.index, round(rss_mb(), 1)))
        st = a.stats()
    wall = time.perf_counter() - t0 - fresh_wall

    def score(lo: float, hi: float, said: list[tuple[float, str]] = preds) -> dict:
        p = [x for x in said if lo <= x[0] < hi]
        e = [x for x in events if lo <= x.time_s < hi]
        r = score_narrations(p, e).exact
        return {"precision": r.precision, "recall": r.recall, "f1": r.f1, "events": r.n_events}

    mem_after_fill = [m for i, m in memory if i >= 1200] or [memory[-1][1]]
    return {
        "engine": engine,
        "frames": n,
        "stream_hours": hours,
        "wall_s": round(wall, 1),
        "frames_per_s": round(n / wall, 1),
        "evictions": st.evictions,
        "first_window": score(0, window),
        "last_window": score(end - window, end),
        "last_window_fresh_start": score(end - window, end, fresh_preds),
        # every window in order: drift shows as a trend, not as one pair of windows
        "f1_by_window": [
            round(score(lo, lo + window)["f1"], 3) for lo in np.arange(0, end - 1e-9, window)
        ],
        "rss_mb": memory,
        "rss_growth_after_10min_mb": round(max(mem_after_fill) - min(mem_after_fill), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="narration quality and memory over a long synthetic stream"
    )
    p.add_argument("--engine", default="engines/demo")
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--window-min", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=424242, help="world seed of the stream")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = long_run(a.engine, a.hours, a.window_min, a.seed)
    text = json.dumps(result, indent=2)
    if a.out:
        write_text_atomic(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
