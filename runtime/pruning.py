"""Training-free savings on top of MoD (off by default): DyCoke-style temporal token pruning.

DyCoke (KD-TAO/DyCoke) takes frames in pairs: the first is kept whole, the second keeps only
its (1 - K) N tokens least similar (cosine, same position) to the first, K = 0.7. In a static
scene most tokens repeat, so the prefill shrinks; the tokens that changed are kept. We keep
at least k tokens so MoD's constant top-k still applies.
"""

from __future__ import annotations

import math

import numpy as np

from onsight.runtime.graph_io import FRAME_EMBEDS


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
