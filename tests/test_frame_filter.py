"""FrameFilter: which frames and tokens reach the LLM when near-duplicate skipping and DyCoke
pruning are on, and the refusal of pruning for a frame step with a fixed token count."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from onsight.runtime.assistant import Assistant
from onsight.runtime.assistant_config import AssistantConfig
from onsight.runtime.graph_io import FRAME_EMBEDS
from onsight.runtime.pruning import FrameFilter, pruning_supported

DEMO = Path(__file__).resolve().parent.parent / "engines" / "demo"
SKIP = AssistantConfig(skip_duplicate_frames=True, duplicate_threshold=0.99)
PRUNE = AssistantConfig(prune_static_tokens=True, prune_ratio=0.7)

RNG = np.random.default_rng(0)
FRAME = RNG.normal(size=(10, 16)).astype(np.float32)


def test_a_near_duplicate_frame_is_skipped_unless_questions_wait():
    f = FrameFilter(2, prune=False)
    assert f.admit(FRAME, 0, False, SKIP) == (True, None)
    assert f.admit(FRAME + 1e-4, 1, False, SKIP) == (False, None)
    assert f.admit(FRAME, 1, True, SKIP) == (True, None)  # questions need a frame to answer at
    assert f.admit(FRAME, 2, False, AssistantConfig()) == (True, None)  # skipping switched off
    other = RNG.normal(size=FRAME.shape).astype(np.float32)
    assert f.admit(other, 3, False, SKIP)[0]
    assert (f.skipped, f.pruned) == (1, 0)
    f.forget()  # a new stream: nothing to compare with
    assert f.admit(other, 0, False, SKIP) == (True, None)


def test_dycoke_keeps_the_changed_tokens_of_every_second_frame_and_counts_the_rest():
    f = FrameFilter(2, prune=True)
    assert f.admit(FRAME, 0, False, PRUNE) == (True, None)  # the first of a pair is kept whole
    changed = FRAME.copy()
    changed[[3, 7, 8]] = RNG.normal(size=(3, 16))
    admitted, keep = f.admit(changed, 1, False, PRUNE)
    assert admitted and keep.tolist() == [3, 7, 8]  # (1 - 0.7) x 10 = 3 least similar
    assert f.pruned == 7 and f.skipped == 0


def test_pruning_is_refused_with_a_reason_for_a_frame_step_of_fixed_size(caplog):
    def backend(n):
        inputs = [SimpleNamespace(name=FRAME_EMBEDS, shape=[n, 16])]
        session = SimpleNamespace(get_inputs=lambda: inputs)
        return SimpleNamespace(sessions={"frame_step": session})

    assert pruning_supported(backend("n_tokens")) and not caplog.records
    assert not pruning_supported(backend(10))
    assert "re-export it to use --prune-static" in caplog.text
    assert pruning_supported(SimpleNamespace())  # TensorRT: plans take a frame-token range


def test_skipping_switched_on_through_the_assistants_config_takes_effect():
    """The bench switches skip_duplicate_frames on an Assistant it already made (a.config)."""
    frame = np.full((48, 64, 3), 90, np.uint8)
    with Assistant(DEMO, AssistantConfig(stats_every=10**6)) as a:
        a.push(frame, 0.0)
        a.push(frame, 0.5)
        a.config = dataclasses.replace(a.config, skip_duplicate_frames=True)
        a.push(frame, 1.0)
        a.push(frame, 1.5)
        st = a.stats()
    assert (st.frames_processed, st.frames_skipped) == (2, 2)
