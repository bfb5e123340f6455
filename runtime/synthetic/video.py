"""Write a playable demo clip of the synthetic world (the `onsight demo-video` command and the
no-camera fallback), optionally with its ground truth as JSON next to it."""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import cv2

from ..errors import OnsightError
from ..files import file_above
from .world import WorldConfig, iter_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoVideo:
    """What `render_demo_video` wrote."""

    path: Path
    events_path: Path | None  # ground-truth JSON, when asked for
    num_frames: int  # frames in the file (world frames x repeat)
    fps: float  # frame rate of the file
    world_frames: int  # frames the world generated
    num_events: int


def _temp_path(final: Path, suffix: str) -> Path:
    # Same directory as the target so os.replace is an atomic rename, never a copy; the
    # suffix is kept because VideoWriter picks the container from it.
    return final.with_name(f".{final.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial{suffix}")


def render_demo_video(
    path: str | os.PathLike[str],
    seed: int = 0,
    seconds: float = 60.0,
    fps: float | None = None,
    size: int = 256,
    config: WorldConfig = WorldConfig(),
    write_events: bool = True,
) -> DemoVideo:
    """Render `seconds` of world `seed` to an mp4 at `path`, scaled so its height is `size`.

    The world ticks at `config.fps`; a higher `fps` repeats each frame (rounded to a whole
    number of times) so players that dislike 2 fps files still show the world's true timing.
    With `write_events`, `<path minus suffix>.events.json` gets the events and questions.
    """
    final = Path(path)
    if final.suffix.lower() != ".mp4":
        raise OnsightError(f"demo video path must end in .mp4, got {final}")
    if final.is_dir():
        raise OnsightError(f"{final} is a directory; give a file path ending in .mp4")
    if not final.parent.is_dir():
        blocker = file_above(final)
        if blocker is not None:
            raise OnsightError(f"cannot write {final}: {blocker} is a file, not a directory")
        raise OnsightError(f"directory {final.parent} does not exist; create it first")
    if size < 16 or seconds <= 0:
        raise OnsightError("demo video needs size >= 16 and seconds > 0")
    repeat = max(1, round((fps or config.fps) / config.fps))
    out_fps = config.fps * repeat
    world_frames = max(1, round(seconds * config.fps))
    width = max(1, round(config.width * size / config.height))

    tmp = _temp_path(final, ".mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), out_fps, (width, size))
    events, questions = [], []
    try:
        if not writer.isOpened():
            raise OnsightError(
                f"OpenCV could not open an mp4 writer at {tmp}; "
                "check the directory is writable and OpenCV was built with FFmpeg"
            )
        for step in iter_stream(seed, config, world_frames):
            big = cv2.resize(step.image, (width, size), interpolation=cv2.INTER_NEAREST)
            bgr = cv2.cvtColor(big, cv2.COLOR_RGB2BGR)
            for _ in range(repeat):
                writer.write(bgr)
            events.extend(e.to_dict() for e in step.events)
            questions.extend(q.to_dict() for q in step.questions)
        writer.release()
        os.replace(tmp, final)
    except BaseException:
        writer.release()
        tmp.unlink(missing_ok=True)
        raise

    events_path = None
    if write_events:
        events_path = final.with_suffix(".events.json")
        truth = {
            "seed": seed,
            "world_fps": config.fps,
            "video_fps": out_fps,
            "world_frames": world_frames,
            "events": events,
            "questions": questions,
        }
        tmp_json = _temp_path(final, ".json")
        try:
            tmp_json.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp_json, events_path)
        except BaseException:
            tmp_json.unlink(missing_ok=True)
            raise
    log.info(
        "wrote %s: %d frames at %.1f fps, %d events",
        final,
        world_frames * repeat,
        out_fps,
        len(events),
    )
    return DemoVideo(
        path=final,
        events_path=events_path,
        num_frames=world_frames * repeat,
        fps=out_fps,
        world_frames=world_frames,
        num_events=len(events),
    )
