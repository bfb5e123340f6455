"""`onsight demo-video out.mp4`, and the cached demo video that `--source demo` plays."""

from __future__ import annotations

import argparse
from pathlib import Path

from onsight.runtime.errors import OnsightError
from onsight.runtime.files import cache_dir
from onsight.runtime.synthetic.video import render_demo_video

DEMO_SEED = 7  # a seed outside the demo model's training range
DEMO_SECONDS = 180.0


def demo_video_path() -> Path:
    """The demo video (`--source demo`, `onsight run --demo`), rendered once (atomically)
    into the user's cache; an empty or missing file is rendered again."""
    path = cache_dir() / f"demo-{DEMO_SEED}.mp4"
    if path.is_file() and path.stat().st_size > 0:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        render_demo_video(path, seed=DEMO_SEED, seconds=DEMO_SECONDS, size=256)
    except OSError as e:
        raise OnsightError(
            f"cannot write the demo video to {path}: {e.strerror or e}; set XDG_CACHE_HOME "
            "to a writable directory"
        ) from e
    return path


def resolve_source(spec: str | int) -> str | int:
    """`demo` means the synthetic demo video (a folder named demo: `./demo`); anything else
    is passed through."""
    if isinstance(spec, str) and spec.strip().lower() == "demo":
        return str(demo_video_path())
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onsight demo-video", description="Render a synthetic demo video."
    )
    p.add_argument("out", help="output .mp4 path")
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--size", type=int, default=256, help="frame height in pixels")
    a = p.parse_args(argv)
    video = render_demo_video(a.out, seed=a.seed, seconds=a.seconds, size=a.size)
    print(
        f"wrote {video.path}: {video.num_frames} frames at {video.fps:g} fps, {video.num_events} events"
    )
    return 0
