"""MoD-aware static KV cache: preallocated per-layer buffers, in-place writes, eviction.

Dense layers hold every token; routed (MoD) layers hold text tokens and only the k kept
vision tokens of each frame, in buffers sized for that. Each layer has an integer length;
slots [0, length) are valid. Keys are stored after RoPE; eviction compacts the kept slots
to the front and rotates their keys to the re-based positions (the only time data moves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onsight.runtime.kv_policy import (
    EvictionPlan,
    EvictionPolicy,
    TokenTable,
    rope_rotate,
    slot_plan,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVLayout:
    """Shapes of the cache, from the bundle's manifest."""

    num_layers: int
    kv_heads: int
    head_dim: int
    capacity_dense: int  # tokens per dense layer
    capacity_mod: int  # tokens per routed layer
    routed: tuple[int, ...]  # layers whose vision tokens are routed (k < N)
    tokens_per_frame: int  # N
    k: int  # vision tokens a routed layer keeps per frame
    dtype: str = "float32"

    def capacity(self, layer: int) -> int:
        return self.capacity_mod if layer in self.routed else self.capacity_dense

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    def bytes_per_frame(self, mod: bool = True) -> int:
        """KV bytes one frame's vision tokens take across all layers, MoD or dense."""
        per_layer = [
            self.k if (mod and i in self.routed) else self.tokens_per_frame
            for i in range(self.num_layers)
        ]
        return sum(per_layer) * self.bytes_per_token_layer

    def frames_in_budget(self, budget_bytes: int, mod: bool = True) -> int:
        """Frames (with their interval token) that fit in a memory budget."""
        per = self.bytes_per_frame(mod) + self.num_layers * self.bytes_per_token_layer
        return int(budget_bytes // per)

    def total_bytes(self) -> int:
        return sum(self.capacity(i) for i in range(self.num_layers)) * self.bytes_per_token_layer


class KVCache:
    """Preallocated buffers (Hkv, capacity, D) per layer, K and V, with lengths and positions."""

    def __init__(self, layout: KVLayout, policy: EvictionPolicy | None = None):
        self.layout = layout
        self.policy = policy or EvictionPolicy()
        dt = np.dtype(layout.dtype)
        L = layout.num_layers
        caps = [layout.capacity(i) for i in range(L)]
        self.k = [np.zeros((layout.kv_heads, c, layout.head_dim), dt) for c in caps]
        self.v = [np.zeros((layout.kv_heads, c, layout.head_dim), dt) for c in caps]
        self.positions = [np.zeros(c, np.int64) for c in caps]
        self.lengths = [0] * L
        self.masks = [np.zeros(c, bool) for c in caps]  # kept in sync with lengths
        self.table = TokenTable(layout.k if layout.routed else layout.tokens_per_frame)
        self.evictions = 0

    def reset(self) -> None:
        for i in range(self.layout.num_layers):
            self.lengths[i] = 0
            self.masks[i][:] = False
        self.table = TokenTable(self.table.k)
        self.evictions = 0

    def fill(self) -> float:
        """Fill of the fullest layer, 0..1."""
        return max(n / len(m) for n, m in zip(self.lengths, self.masks, strict=True))

    def frames_fit(self) -> int:
        """Frames (with an interval token each) the cache holds at capacity."""
        lay = self.layout
        dense = lay.capacity_dense // (lay.tokens_per_frame + 1)
        if not lay.routed:
            return dense
        return min(dense, lay.capacity_mod // (lay.k + 1))

    def ensure_room(self, new_dense: int, new_mod: int, inv_freq: np.ndarray) -> bool:
        """Evict by policy if the next step would overflow any layer. Returns True if it did."""
        routed = self.layout.routed
        full = any(
            self.lengths[i] + (new_mod if i in routed else new_dense) > len(self.masks[i])
            for i in range(self.layout.num_layers)
        )
        if not full:
            return False
        plan = self.table.plan(
            self.policy,
            self.layout.capacity_dense,
            self.layout.capacity_mod,
            bool(routed),
            new_dense,
            new_mod if routed else new_dense,
        )
        self.table.apply(plan)
        self._rebase(plan, inv_freq)
        self.evictions += 1
        log.debug("evicted to %s tokens per layer", self.lengths)
        return True

    def _rebase(self, plan: EvictionPlan, inv_freq: np.ndarray) -> None:
        for i in range(self.layout.num_layers):
            kept, delta = slot_plan(self.positions[i][: self.lengths[i]], plan)
            n = len(kept)
            self.k[i][:, :n] = rope_rotate(self.k[i][:, kept], delta, inv_freq)
            self.v[i][:, :n] = self.v[i][:, kept]
            self.positions[i][:n] = self.positions[i][kept] + delta
            self._set_length(i, n)

    def _set_length(self, i: int, n: int) -> None:
        old = self.lengths[i]
        if n > old:
            self.masks[i][old:n] = True
        else:
            self.masks[i][n:old] = False
        self.lengths[i] = n

    def write(self, i: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """Write new keys/values (Hkv, T, D) in place after the layer's valid slots."""
        n, t = self.lengths[i], k.shape[1]
        assert n + t <= len(self.masks[i]), "ensure_room must run before write"
        self.k[i][:, n : n + t] = k
        self.v[i][:, n : n + t] = v
        self.positions[i][n : n + t] = positions
        self._set_length(i, n + t)
