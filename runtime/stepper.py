"""A Stepper over the MoD-aware KV cache; backends supply only the two step calls."""

from __future__ import annotations

import time

import numpy as np

from onsight.runtime.kv_cache import KVCache, KVLayout
from onsight.runtime.kv_policy import FRAME, TURN, EvictionPolicy

# (logits (vocab,), new keys per layer, new values per layer[, kept indices per routed layer])
TextOut = tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]
FrameOut = tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray]]


class CachedStepper:
    """Evicts when needed, assigns positions, runs a step, writes its K/V in place.

    Subclasses implement `run_text` and `run_frame` (the exported graphs or the torch model).
    `all_routed` lists every layer with a router (their kept indices come back in order);
    `layout.routed` lists those that actually drop tokens (k < N).
    """

    def __init__(
        self,
        layout: KVLayout,
        inv_freq: np.ndarray,
        all_routed: tuple[int, ...],
        policy: EvictionPolicy | None = None,
        spans: bool = True,
    ):
        self.layout = layout
        self.cache = KVCache(layout, policy, spans)
        self.inv_freq = np.asarray(inv_freq, np.float32)
        self.all_routed = tuple(all_routed)
        self.prev_embeds: np.ndarray | None = None

    @property
    def evictions(self) -> int:
        return self.cache.evictions

    def reset(self) -> None:
        self.cache.reset()
        self.prev_embeds = None

    def run_text(self, ids: np.ndarray, positions: np.ndarray) -> TextOut:
        raise NotImplementedError

    def run_frame(
        self, ids: np.ndarray, embeds: np.ndarray, prev: np.ndarray, positions: np.ndarray
    ) -> FrameOut:
        raise NotImplementedError

    def ensure_room(self, new_dense: int, new_mod: int, protect: int | None = None) -> None:
        """Evict if the next step would overflow (device steppers stage the cache first)."""
        self.cache.ensure_room(new_dense, new_mod, self.inv_freq, protect)

    def write(self, i: int, k, v, positions: np.ndarray) -> None:
        """Append a step's new K/V of layer i to the cache (device steppers copy on the GPU)."""
        self.cache.write(i, k, v, positions)

    def text(self, ids: list[int], kind: int, group: int) -> np.ndarray:
        table = self.cache.table
        decoding = kind == TURN and table.n > 0 and table.groups[-1] == group
        # a turn being decoded keeps its own tokens (its question) through an eviction
        self.ensure_room(len(ids), len(ids), group if decoding else None)
        pos = self.cache.table.append(len(ids), kind, group)
        logits, nk, nv = self.run_text(np.asarray(ids, np.int64), pos)
        for i in range(self.layout.num_layers):
            self.write(i, nk[i], nv[i], pos)
        return logits

    def frame(
        self, ids: list[int], embeds: np.ndarray, group: int, keep: np.ndarray | None = None
    ) -> np.ndarray:
        """`keep` (sorted token indices, at least k) prefills only those vision tokens."""
        full = embeds
        prev_full = self.prev_embeds if self.prev_embeds is not None else np.zeros_like(full)
        if keep is not None:
            embeds, prev_full = full[keep], prev_full[keep]
        t, n = len(ids), embeds.shape[0]
        self.ensure_room(t + n, t + self.layout.k)
        table = self.cache.table
        pos_text = table.append(t, FRAME, group)
        pos_vis = table.append(n, FRAME, group, vision=True)
        positions = np.concatenate([pos_text, pos_vis])
        logits, nk, nv, kept = self.run_frame(
            np.asarray(ids, np.int64), embeds, prev_full, positions
        )
        self.prev_embeds = full
        kept_by_layer = dict(zip(self.all_routed, kept, strict=True))
        for i in range(self.layout.num_layers):
            if i in self.layout.routed:
                pos = np.concatenate([pos_text, pos_vis[np.asarray(kept_by_layer[i])]])
            else:
                pos = positions
            self.write(i, nk[i], nv[i], pos)
        return logits


class TimedStepper:
    """Wraps a stepper to time frame prefill (the last frame) and text decoding (summed
    until the caller zeroes `decode_ms`) apart, in milliseconds."""

    def __init__(self, inner):
        self.inner = inner
        self.prefill_ms = 0.0
        self.decode_ms = 0.0

    def text(self, ids, kind, group):
        t = time.perf_counter()
        out = self.inner.text(ids, kind, group)
        self.decode_ms += (time.perf_counter() - t) * 1e3
        return out

    def frame(self, ids, embeds, group, keep=None):
        t = time.perf_counter()
        if keep is None:  # wrapped steppers need not know about pruning
            out = self.inner.frame(ids, embeds, group)
        else:
            out = self.inner.frame(ids, embeds, group, keep)
        self.prefill_ms = (time.perf_counter() - t) * 1e3
        return out
