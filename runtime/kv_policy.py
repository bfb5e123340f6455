"""What the KV cache holds, token by token, and what to drop when it is full.

Shared by the torch-free runtime and the PyTorch reference so that both evict the same
tokens at the same step. Policy (StreamingLLM / StreamingVLM): keep the system prompt as an
attention sink, keep recent narration turns within a text budget, drop the oldest frames
(with the interval text before each). Positions are then re-based to be contiguous, so a
stream of any length never uses a position beyond the cache's capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SINK, FRAME, TURN = 0, 1, 2  # token groups: system prompt, a frame (+ text before it), a turn


@dataclass(frozen=True)
class EvictionPolicy:
    """How much to free and what to keep when the cache is full."""

    free_fraction: float = 0.25  # free this share of capacity per eviction, so evictions are rare
    keep_text_tokens: int = 256  # recent narration / question / answer tokens always kept


def mod_capacity(cap_dense: int, tokens_per_frame: int, k: int, text_reserve: int) -> int:
    """Routed layers' capacity: room for `text_reserve` text tokens (system prompt and the
    narration budget) at full size, the rest scaled by (k + 1) / (N + 1) (a frame and its
    interval token), so both layer groups fill at about the same frame."""
    if k >= tokens_per_frame:
        return cap_dense
    reserve = min(text_reserve, cap_dense)
    scaled = math.ceil((cap_dense - reserve) * (k + 1) / (tokens_per_frame + 1))
    return min(cap_dense, reserve + max(scaled, k + 1))


class CacheFullError(RuntimeError):
    """Nothing evictable is left (the system prompt alone fills the cache)."""


@dataclass
class EvictionPlan:
    keep: np.ndarray  # (num_tokens,) bool over the token table
    new_positions: np.ndarray  # (num_kept,) int64, contiguous from 0
    old_positions: np.ndarray  # (num_kept,) int64


class TokenTable:
    """Every token currently in the cache: its position, group kind, group id, and vision flag.

    Dense layers hold every token; routed (MoD) layers hold every text token and k vision
    tokens per frame. Appends are amortised O(1) (arrays grow by doubling).
    """

    def __init__(self, k: int):
        self.k = k  # vision tokens per frame that routed layers keep
        self.n = 0
        self._pos = np.zeros(64, np.int64)
        self._kind = np.zeros(64, np.int8)
        self._group = np.zeros(64, np.int64)
        self._vision = np.zeros(64, bool)
        self.next_group = 0
        self.next_position = 0

    def _grow(self, extra: int) -> None:
        need = self.n + extra
        if need <= len(self._pos):
            return
        size = max(need, 2 * len(self._pos))
        for name in ("_pos", "_kind", "_group", "_vision"):
            old = getattr(self, name)
            new = np.zeros(size, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def new_group(self) -> int:
        self.next_group += 1
        return self.next_group - 1

    def append(self, count: int, kind: int, group: int, vision: bool = False) -> np.ndarray:
        """Add `count` tokens; returns their positions."""
        self._grow(count)
        s = slice(self.n, self.n + count)
        positions = np.arange(self.next_position, self.next_position + count, dtype=np.int64)
        self._pos[s], self._kind[s], self._group[s], self._vision[s] = (
            positions,
            kind,
            group,
            vision,
        )
        self.n += count
        self.next_position += count
        return positions

    @property
    def positions(self) -> np.ndarray:
        return self._pos[: self.n]

    @property
    def kinds(self) -> np.ndarray:
        return self._kind[: self.n]

    @property
    def groups(self) -> np.ndarray:
        return self._group[: self.n]

    @property
    def vision(self) -> np.ndarray:
        return self._vision[: self.n]

    def lengths(self) -> tuple[int, int]:
        """(tokens in dense layers, tokens in routed layers)."""
        text = int((~self.vision).sum())
        frames = len(np.unique(self.groups[self.vision]))
        return self.n, text + min(self.k, self._frame_size()) * frames

    def _frame_size(self) -> int:
        if not self.vision.any():
            return self.k
        g = self.groups[self.vision]
        return int(np.bincount(g - g.min()).max())

    def plan(
        self,
        policy: EvictionPolicy,
        cap_dense: int,
        cap_mod: int,
        routed: bool,
        new_dense: int = 0,
        new_mod: int = 0,
        protect: int | None = None,
    ) -> EvictionPlan:
        """Choose tokens to keep so that both layer groups drop below (1 - free) capacity
        and the next step (`new_*` tokens) fits. The turn group `protect` (the one being
        decoded: an answer must keep its question) is dropped only if nothing else is left."""
        target_dense = min(int(cap_dense * (1 - policy.free_fraction)), cap_dense - new_dense)
        target_mod = min(int(cap_mod * (1 - policy.free_fraction)), cap_mod - new_mod)
        kinds, groups, vision = self.kinds, self.groups, self.vision
        keep = np.ones(self.n, bool)
        # Oldest narration turns beyond the text budget go first.
        turn_groups = _ordered_unique(groups[kinds == TURN])
        protected = protect is not None and bool((turn_groups == protect).any())
        if protected:  # last in line in both passes, and never dropped in the first
            turn_groups = np.append(turn_groups[turn_groups != protect], protect)
        turn_tokens = int((kinds == TURN).sum())
        for g in turn_groups[:-1] if protected else turn_groups:
            if turn_tokens <= policy.keep_text_tokens:
                break
            sel = groups == g
            keep &= ~sel
            turn_tokens -= int(sel.sum())
        n_frame_vision = min(self.k, self._frame_size())

        def sizes() -> tuple[int, int]:
            kept_text = int((keep & ~vision).sum())
            kept_frames = len(np.unique(groups[keep & vision]))
            return int(keep.sum()), kept_text + n_frame_vision * kept_frames

        for g in _ordered_unique(groups[kinds == FRAME]):
            d, m = sizes()
            if d <= target_dense and (not routed or m <= target_mod):
                break
            keep &= groups != g
        d, m = sizes()
        if d > target_dense or (routed and m > target_mod):
            # Still too full: drop turns even inside the text budget, oldest first.
            for g in turn_groups:
                keep &= groups != g
                d, m = sizes()
                if d <= target_dense and (not routed or m <= target_mod):
                    break
        d, m = sizes()
        if d > target_dense or (routed and m > target_mod):
            raise CacheFullError(
                f"the KV cache ({cap_dense} tokens) cannot hold the system prompt and one frame; "
                "re-export with a larger --kv-capacity or a shorter system prompt"
            )
        old = self.positions[keep]
        return EvictionPlan(
            keep=keep, new_positions=np.arange(len(old), dtype=np.int64), old_positions=old
        )

    def apply(self, plan: EvictionPlan) -> None:
        """Drop evicted tokens and re-base positions (the caller re-bases its cache)."""
        keep = plan.keep
        n = int(keep.sum())
        self._kind[:n] = self.kinds[keep]
        self._group[:n] = self.groups[keep]
        self._vision[:n] = self.vision[keep]
        self._pos[:n] = plan.new_positions
        self.n = n
        self.next_position = n


def _ordered_unique(a: np.ndarray) -> np.ndarray:
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def slot_plan(slot_positions: np.ndarray, plan: EvictionPlan) -> tuple[np.ndarray, np.ndarray]:
    """For one layer's slots (their old positions), which to keep and each kept slot's delta.

    Returns (kept slot indices in order, position delta for each kept slot).
    """
    old = plan.old_positions  # ascending
    at = np.searchsorted(old, slot_positions)
    at_c = np.minimum(at, len(old) - 1)
    found = (
        (at < len(old)) & (old[at_c] == slot_positions)
        if len(old)
        else np.zeros(len(slot_positions), bool)
    )
    kept = np.nonzero(found)[0].astype(np.int64)
    delta = plan.new_positions[at_c[kept]] - slot_positions[kept]
    return kept, delta.astype(np.int64)


def rope_rotate(keys: np.ndarray, delta: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate cached (post-RoPE) keys by a per-slot position change. keys: (Hkv, S, D)."""
    freqs = delta.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]  # (S, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb).astype(keys.dtype), np.sin(emb).astype(keys.dtype)
    half = keys.shape[-1] // 2
    rot = np.concatenate([-keys[..., half:], keys[..., :half]], axis=-1)
    return keys * cos + rot * sin
