"""Procedurally generated video with exact ground truth: the demo model's world.

torch-free (numpy + OpenCV). `generate_stream` / `iter_stream` make frames and truth,
`grammar` is the closed language it speaks, `metrics` scores a narrator against it and
`render_demo_video` writes a playable clip.
"""

from .grammar import (
    COLOURS,
    DIRECTIONS,
    EVENT_KINDS,
    SHAPES,
    SIDES,
    EventKind,
    Narration,
    QuestionKind,
    all_sentences,
    narrate,
    normalise,
    parse_narration,
    vocabulary,
)
from .metrics import (
    MatchScores,
    NarrationReport,
    match_narrations,
    question_accuracy,
    recall_by_objects_in_view,
    score_narrations,
    wrong_details,
)
from .video import DemoVideo, render_demo_video
from .world import (
    BACKGROUNDS,
    Event,
    FrameState,
    ObjectState,
    Question,
    Stream,
    StreamStep,
    WorldConfig,
    curriculum,
    generate_stream,
    iter_stream,
    questions_for_state,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DIRECTIONS",
    "EVENT_KINDS",
    "SHAPES",
    "SIDES",
    "DemoVideo",
    "Event",
    "EventKind",
    "FrameState",
    "MatchScores",
    "Narration",
    "NarrationReport",
    "ObjectState",
    "Question",
    "QuestionKind",
    "Stream",
    "StreamStep",
    "WorldConfig",
    "all_sentences",
    "curriculum",
    "generate_stream",
    "iter_stream",
    "match_narrations",
    "narrate",
    "normalise",
    "parse_narration",
    "question_accuracy",
    "questions_for_state",
    "render_demo_video",
    "score_narrations",
    "recall_by_objects_in_view",
    "wrong_details",
    "vocabulary",
]
