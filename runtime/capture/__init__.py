"""Capture layer: video sources, live threading and reconnection, parallel decoding, and a
generic overlapped stage pipeline. Torch-free (numpy + OpenCV)."""

from ..errors import SourceSpecError
from .live import LiveSource
from .opening import classify_spec, gstreamer_available, open_source
from .parallel import ParallelFileSource, Segment, decode_file_parallel
from .pipeline import SKIP, Pipeline, Stage, StageStats
from .sources import (
    BackoffConfig,
    CaptureOptions,
    CaptureStats,
    FrameSampler,
    SequentialSource,
    Source,
    SourceKind,
    crosses_grid,
)

__all__ = [
    "SKIP",
    "BackoffConfig",
    "CaptureOptions",
    "CaptureStats",
    "FrameSampler",
    "LiveSource",
    "ParallelFileSource",
    "Pipeline",
    "Segment",
    "SequentialSource",
    "Source",
    "SourceKind",
    "SourceSpecError",
    "Stage",
    "StageStats",
    "classify_spec",
    "crosses_grid",
    "decode_file_parallel",
    "gstreamer_available",
    "open_source",
]
