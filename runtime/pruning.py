"""Training-free savings on top of MoD (off by default): DyCoke-style temporal token pruning,
and skipping near-duplicate frames.

DyCoke (KD-TAO/DyCoke) takes frames in pairs: the first is kept whole, the second keeps only
its (1 - K) N tokens least similar (cosine, same position) to the first, K = 0.7. In a static
scene most tokens repeat, so the prefill shrinks; the tokens that changed are kept. We keep
at least k tokens so MoD's constant top-k still applies.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from onsight.runtime.graph_io import FRAME_EMBEDS

log = logging.getLogger(__name__)


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per token position: (N, hidden) x (N, hidden) -> (N,)."""
    num = (a * b).sum(-1)
    return num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-6)


def dycoke_keep(
    embeds: np.ndarray, prev: np.ndarray | None, frame_number: int, k: int, prune: float = 0.7
) -> np.ndarray | None:
    """Token indices to prefill for this frame, or None to keep the whole frame."""
    if prev is None or frame_number % 2 == 0:
        return None
    n = embeds.shape[0]
    m = min(n, max(k, math.ceil((1.0 - prune) * n - 1e-9)))
    if m >= n:
        return None
    least_similar = np.argsort(token_cosine(embeds, prev), kind="stable")[:m]
    return np.sort(least_similar).astype(np.int64)


def graph_accepts_pruned_frames(session_inputs) -> bool:
    """Bundles exported before dynamic frame tokens have a fixed N: pruning is unavailable."""
    for i in session_inputs:
        if i.name == FRAME_EMBEDS:
            return isinstance(i.shape[0], str) or i.shape[0] is None
    return False


def pruning_supported(backend) -> bool:
    """Whether `backend`'s frame step takes a pruned frame (fewer than N tokens); says why not."""
    sessions = getattr(backend, "sessions", None)
    if sessions is None:  # TensorRT plans are built with a frame-token range
        return True
    if graph_accepts_pruned_frames(sessions["frame_step"].get_inputs()):
        return True
    log.warning(
        "this bundle's frame step takes exactly N tokens; re-export it to use "
        "--prune-static (pruning is off)"
    )
    return False


class FrameFilter:
    """What of each frame reaches the LLM. With `config.skip_duplicate_frames`, none of a frame
    whose tokens barely changed since the last frame that did (mean cosine >=
    `config.duplicate_threshold`; never while questions wait, which need a frame to be
    answered at); with `prune` (fixed at start: the frame step must take pruned frames),
    DyCoke's changed tokens of every second frame (`dycoke_keep` at `config.prune_ratio`, at
    least k). The config is read at each frame, so a caller may switch skipping on and off.
    Counts what it saved."""

    def __init__(self, k: int, prune: bool):
        self.k, self.prune = k, prune
        self.last: np.ndarray | None = None  # the tokens of the last frame let through
        self.skipped = 0  # frames skipped as duplicates
        self.pruned = 0  # tokens pruned

    def admit(
        self, embeds: np.ndarray, frame_number: int, questions_waiting: bool, config
    ) -> tuple[bool, np.ndarray | None]:
        """(False, None) for a frame to skip; else (True, keep): the token indices to
        prefill, or None for all. `frame_number`: frames let through before this one;
        `config`: the AssistantConfig in force."""
        if (
            config.skip_duplicate_frames
            and self.last is not None
            and not questions_waiting
            and float(token_cosine(embeds, self.last).mean()) >= config.duplicate_threshold
        ):
            self.skipped += 1
            return False, None
        keep = None
        if self.prune:
            keep = dycoke_keep(embeds, self.last, frame_number, self.k, config.prune_ratio)
            if keep is not None:
                self.pruned += embeds.shape[0] - len(keep)
        self.last = embeds
        return True, keep

    def forget(self) -> None:
        """A new stream: the next frame is compared with nothing."""
        self.last = None
