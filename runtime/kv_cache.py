"""MoD-aware static KV cache: preallocated per-layer buffers, in-place writes, eviction.

Dense layers hold every token; routed (MoD) layers hold text tokens and only the k kept
vision tokens of each frame, in buffers sized for that. Each layer has an integer length;
slots [0, length) are valid. Keys are stored after RoPE; eviction compacts the kept slots
to the front and rotates their keys to the re-based positions.

Steps attend over a *span* of each layer's buffer, not its whole capacity: the span covers
the valid slots, rounded up, and grows geometrically (x1.25, in multiples of 64 tokens) until
it reaches the capacity. Each layer's buffer is one flat allocation whose first
Hkv * span * D values are the contiguous (Hkv, span, D) array the graphs read, so feeding a
step copies nothing; growing the span moves each head's rows once (amortised: a fraction of
a row per token written), as does an eviction. A short stream so never pays for attention
over a capacity sized for hours.
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

SPAN_MIN = 64  # tokens; spans are multiples of this (or the capacity)
SPAN_GROWTH = 1.25


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


def _round_span(tokens: int, capacity: int) -> int:
    return min(capacity, max(SPAN_MIN, -(-tokens // SPAN_MIN) * SPAN_MIN))


class KVCache:
    """Preallocated buffers per layer, K and V, with lengths, positions and attended spans.

    `k[i]` / `v[i]` are (Hkv, span_i, D) views of layer i's buffer; `mask(i)` is the matching
    (span_i,) validity mask. With `spans=False` the span is always the whole capacity (for
    backends whose graphs take a fixed-size cache).
    """

    def __init__(self, layout: KVLayout, policy: EvictionPolicy | None = None, spans: bool = True):
        self.layout = layout
        self.policy = policy or EvictionPolicy()
        self.spans = spans
        dt = np.dtype(layout.dtype)
        L = layout.num_layers
        caps = [layout.capacity(i) for i in range(L)]
        row = layout.kv_heads * layout.head_dim
        self._kbuf = [np.zeros(row * c, dt) for c in caps]
        self._vbuf = [np.zeros(row * c, dt) for c in caps]
        self.span = [self._initial_span(c) for c in caps]
        self.k = [self._view(self._kbuf[i], self.span[i]) for i in range(L)]
        self.v = [self._view(self._vbuf[i], self.span[i]) for i in range(L)]
        self.positions = [np.zeros(c, np.int64) for c in caps]
        self.lengths = [0] * L
        self.masks = [np.zeros(c, bool) for c in caps]  # kept in sync with lengths
        self.table = TokenTable(layout.k if layout.routed else layout.tokens_per_frame)
        self.evictions = 0

    def _initial_span(self, capacity: int) -> int:
        return _round_span(0, capacity) if self.spans else capacity

    def _view(self, buf: np.ndarray, span: int) -> np.ndarray:
        lay = self.layout
        return buf[: lay.kv_heads * span * lay.head_dim].reshape(lay.kv_heads, span, lay.head_dim)

    def mask(self, i: int) -> np.ndarray:
        """Validity of layer i's attended slots, (span_i,)."""
        return self.masks[i][: self.span[i]]

    def _respan(self, i: int, new: int) -> None:
        """Re-lay layer i's buffer for a span of `new` slots, moving each head's valid rows."""
        old, n = self.span[i], self.lengths[i]
        if new == old:
            return
        assert n <= new <= len(self.masks[i])
        D, H = self.layout.head_dim, self.layout.kv_heads
        # growing: move the last head first (destinations lie above sources); shrinking: first
        heads = range(H - 1, 0, -1) if new > old else range(1, H)
        for buf in (self._kbuf[i], self._vbuf[i]):
            for h in heads:
                buf[h * new * D : (h * new + n) * D] = buf[h * old * D : (h * old + n) * D]
        self.span[i] = new
        self.k[i] = self._view(self._kbuf[i], new)
        self.v[i] = self._view(self._vbuf[i], new)

    def reset(self) -> None:
        for i in range(self.layout.num_layers):
            self.lengths[i] = 0
            self.masks[i][:] = False
            self._respan(i, self._initial_span(len(self.masks[i])))
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

    def needs_room(self, new_dense: int, new_mod: int) -> bool:
        """Whether the next step's tokens would overflow any layer."""
        routed = self.layout.routed
        return any(
            self.lengths[i] + (new_mod if i in routed else new_dense) > len(self.masks[i])
            for i in range(self.layout.num_layers)
        )

    def ensure_room(
        self, new_dense: int, new_mod: int, inv_freq: np.ndarray, protect: int | None = None
    ) -> bool:
        """Evict by policy if the next step would overflow any layer (keeping the turn group
        `protect` unless nothing else can go). Returns True if it did."""
        if not self.needs_room(new_dense, new_mod):
            return False
        routed = self.layout.routed
        plan = self.table.plan(
            self.policy,
            self.layout.capacity_dense,
            self.layout.capacity_mod,
            bool(routed),
            new_dense,
            new_mod if routed else new_dense,
            protect=protect,
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

    def truncate(self, i: int, n: int) -> None:
        """Forget layer i's slots from n on (the span stays; for benchmarks that rewind)."""
        assert n <= self.lengths[i]
        self._set_length(i, n)

    def write(self, i: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """Write new keys/values (Hkv, T, D) in place after the layer's valid slots."""
        n, t = self.lengths[i], k.shape[1]
        cap = len(self.masks[i])
        assert n + t <= cap, "ensure_room must run before write"
        if n + t > self.span[i]:
            self._respan(i, _round_span(max(n + t, int(self.span[i] * SPAN_GROWTH)), cap))
        self.k[i][:, n : n + t] = k
        self.v[i][:, n : n + t] = v
        self.advance(i, positions)

    def advance(self, i: int, positions: np.ndarray) -> None:
        """Record tokens appended to layer i (their K/V written by the caller, e.g. on a GPU)."""
        n, t = self.lengths[i], len(positions)
        self.positions[i][n : n + t] = positions
        self._set_length(i, n + t)
