"""How an Assistant runs a bundle: one frozen dataclass, checked when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from onsight.runtime.errors import OnsightError


@dataclass(frozen=True)
class AssistantConfig:
    """How the assistant runs a bundle; every field has a sensible default."""

    backend: str = "auto"  # auto | onnxruntime | onnxruntime:cpu | onnxruntime:cuda | tensorrt
    fps: float | None = None  # sampling rate; None takes the bundle's default (e.g. 2)
    realtime: bool = True  # files: pace to the wall clock like a camera (live sources always are)
    max_new_tokens: int | None = None  # cap on one narration; None takes the bundle's
    temperature: float = 0.0  # 0 is greedy, as the reference
    threads: int | None = None  # onnxruntime intra-op threads; None lets it decide
    decode_workers: int = 1  # files without realtime: parallel keyframe-segment decoders
    skip_duplicate_frames: bool = False  # skip frames whose tokens barely changed
    duplicate_threshold: float = 0.995  # mean token cosine above which a frame is a duplicate
    prune_static_tokens: bool = False  # DyCoke-style: 2nd frame of each pair keeps changed tokens
    prune_ratio: float = 0.7  # DyCoke's K: share of that frame's tokens pruned
    stats_every: int = 10  # a StatsEvent every this many processed frames

    def __post_init__(self) -> None:
        problems = []
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            problems.append(f"fps={self.fps!r}: give a positive rate such as 2, or None")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r}: give >= 1, or None")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature={self.temperature!r}: give 0 (greedy) or more")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads!r}: give >= 1, or None")
        if self.decode_workers < 1:
            problems.append(f"decode_workers={self.decode_workers!r}: give >= 1")
        if not 0 < self.duplicate_threshold <= 1:
            problems.append(f"duplicate_threshold={self.duplicate_threshold!r}: give (0, 1]")
        if not 0 <= self.prune_ratio < 1:
            problems.append(f"prune_ratio={self.prune_ratio!r}: give [0, 1)")
        if self.stats_every < 1:
            problems.append(f"stats_every={self.stats_every!r}: give >= 1")
        if problems:
            raise OnsightError("AssistantConfig: " + "; ".join(problems))
