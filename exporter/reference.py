"""The PyTorch oracle: a static KV cache, a Stepper over it, and a no-cache recomputation.

Every later parity check (ONNX export, runtime) compares against `reference_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onsight.exporter.model import StreamingModel
from onsight.runtime.kv_policy import (
    FRAME,
    EvictionPolicy,
    TokenTable,
    mod_capacity,
    rope_rotate,
    slot_plan,
)
from onsight.runtime.stream_loop import Sampler, StreamLoop
from onsight.runtime.template import build_template_ids


class TorchKVCache:
    """Preallocated per-layer K/V (Hkv, capacity, D) with an integer length and in-place writes.

    Each slot also records its token's position, so eviction can re-base it.
    """

    def __init__(self, capacities: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.capacities = capacities
        self.k = [torch.zeros(kv_heads, c, head_dim, dtype=dtype) for c in capacities]
        self.v = [torch.zeros(kv_heads, c, head_dim, dtype=dtype) for c in capacities]
        self.positions = [np.zeros(c, np.int64) for c in capacities]
        self.lengths = [0] * len(capacities)

    def mask(self, i: int) -> torch.Tensor:
        return torch.arange(self.capacities[i]) < self.lengths[i]  # (capacity,) bool

    def past(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        return list(zip(self.k, self.v, strict=True)), [self.mask(i) for i in range(len(self.k))]

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, positions: np.ndarray) -> None:
        n, t = self.lengths[i], k.shape[1]
        assert n + t <= self.capacities[i], "caller must evict before writing"
        self.k[i][:, n : n + t] = k
        self.v[i][:, n : n + t] = v
        self.positions[i][n : n + t] = positions
        self.lengths[i] = n + t

    def rebase(self, plan, inv_freq: np.ndarray) -> None:
        """Keep the planned tokens, compact them to the front, rotate keys to new positions."""
        for i in range(len(self.k)):
            kept, delta = slot_plan(self.positions[i][: self.lengths[i]], plan)
            n = len(kept)
            idx = torch.from_numpy(kept)
            keys = self.k[i][:, idx].numpy()
            self.k[i][:, :n] = torch.from_numpy(rope_rotate(keys, delta, inv_freq))
            self.v[i][:, :n] = self.v[i][:, idx].clone()
            self.positions[i][:n] = self.positions[i][kept] + delta
            self.lengths[i] = n


class TorchStepper:
    """Runs the reference model's steps and maintains its cache (a `Stepper`)."""

    def __init__(
        self,
        model: StreamingModel,
        capacity: int = 4096,
        policy: EvictionPolicy | None = None,
        text_reserve: int = 0,
    ):
        dec = model.decoder
        self.dec = dec
        self.N = model.cfg.tokens_per_frame
        self.k = dec.k
        self.routed = {i for i in dec.routed if dec.k < self.N}
        self.cap_dense = capacity
        self.policy = policy or EvictionPolicy()
        self.cap_mod = mod_capacity(capacity, self.N, self.k, text_reserve)
        caps = [self.cap_mod if i in self.routed else capacity for i in range(len(dec.layers))]
        self.cache = TorchKVCache(caps, dec.num_kv_heads, dec.head_dim, dec.embed.weight.dtype)
        self.table = TokenTable(self.k if self.routed else self.N)
        self.inv_freq = dec.inv_freq.numpy()
        self.evictions = 0

    def _ensure(self, new_dense: int, new_mod: int) -> None:
        c = self.cache
        full = any(
            c.lengths[i] + (new_mod if i in self.routed else new_dense) > c.capacities[i]
            for i in range(len(c.k))
        )
        if not full:
            return
        plan = self.table.plan(self.policy, self.cap_dense, self.cap_mod, bool(self.routed))
        self.table.apply(plan)
        c.rebase(plan, self.inv_freq)
        self.evictions += 1

    @torch.no_grad()
    def text(self, ids: list[int], kind: int, group: int) -> np.ndarray:
        self._ensure(len(ids), len(ids))
        pos = self.table.append(len(ids), kind, group)
        past, masks = self.cache.past()
        logits, nk, nv = self.dec.text_step(
            torch.tensor(ids, dtype=torch.int64), torch.from_numpy(pos), past, masks
        )
        for i, (k, v) in enumerate(zip(nk, nv, strict=True)):
            self.cache.write(i, k, v, pos)
        return logits.float().numpy()

    @torch.no_grad()
    def frame(self, ids: list[int], embeds: np.ndarray, group: int) -> np.ndarray:
        t, n = len(ids), embeds.shape[0]
        self._ensure(t + n, t + self.k)
        pos_text = self.table.append(t, FRAME, group)
        pos_vis = self.table.append(n, FRAME, group, vision=True)
        positions = np.concatenate([pos_text, pos_vis])
        past, masks = self.cache.past()
        embeds_t = torch.from_numpy(np.ascontiguousarray(embeds))
        prev = getattr(self, "_prev", None)
        prev_t = torch.zeros_like(embeds_t) if prev is None else prev
        logits, nk, nv, kept = self.dec.frame_step(
            torch.tensor(ids, dtype=torch.int64), embeds_t, prev_t, torch.from_numpy(positions), past, masks
        )
        self._prev = embeds_t
        kept_iter = iter(kept)
        for i, (k, v) in enumerate(zip(nk, nv, strict=True)):
            if i in self.dec.routed:
                idx = next(kept_iter).numpy()
                if i in self.routed:
                    self.cache.write(i, k, v, np.concatenate([pos_text, pos_vis[idx]]))
                    continue
            self.cache.write(i, k, v, positions)
        return logits.float().numpy()


def reference_loop(
    model: StreamingModel,
    tokenizer_json: str | Path,
    capacity: int = 4096,
    policy: EvictionPolicy | None = None,
    max_new_tokens: int | None = None,
    sampler: Sampler | None = None,
) -> StreamLoop:
    """The oracle: VideoLLM-online's streaming loop over the PyTorch model."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tpl = model.cfg.template
    ids = build_template_ids(tok, tpl.__dict__)
    policy = policy or EvictionPolicy()
    reserve = len(ids.sink) + policy.keep_text_tokens
    return StreamLoop(
        TorchStepper(model, capacity, policy, text_reserve=reserve),
        ids,
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        threshold=tpl.threshold,
        max_new_tokens=max_new_tokens or tpl.max_new_tokens,
        sampler=sampler,
    )


# ---- independent recomputation of a whole history, without any cache ----


@dataclass(frozen=True)
class Segment:
    """A piece of a stream: text token ids, or one frame's embeddings (N, hidden)."""

    ids: tuple[int, ...] = ()
    frame: np.ndarray | None = None


@torch.no_grad()
def recompute_logits(model: StreamingModel, segments: list[Segment]) -> list[np.ndarray]:
    """Logits at the end of every segment, recomputing the whole sequence layer by layer.

    Routed layers keep, per frame, the top-k vision tokens by their score at that layer;
    attention is plain causal attention over the tokens each layer processes.
    """
    dec = model.decoder
    N, k = model.cfg.tokens_per_frame, dec.k
    pieces, is_vis, frame_of, ends, frames = [], [], [], [], []
    for seg in segments:
        if seg.frame is not None:
            e = torch.from_numpy(np.ascontiguousarray(seg.frame))
            pieces.append(e)
            is_vis += [True] * len(e)
            frame_of += [len(frames)] * len(e)
            frames.append(e)
        else:
            pieces.append(dec.embed(torch.tensor(seg.ids, dtype=torch.int64)))
            is_vis += [False] * len(seg.ids)
            frame_of += [-1] * len(seg.ids)
        ends.append(sum(len(p) for p in pieces) - 1)
    x = torch.cat(pieces)  # (T, hidden)
    T = x.shape[0]
    positions = torch.arange(T)
    is_vis_t = torch.tensor(is_vis)
    frame_of_t = torch.tensor(frame_of)
    empty_kv = torch.zeros(dec.num_kv_heads, 0, dec.head_dim, dtype=x.dtype)
    empty_mask = torch.zeros(0, dtype=torch.bool)
    for i in range(len(dec.layers)):
        active = torch.ones(T, dtype=torch.bool)
        weights = torch.ones(T, dtype=x.dtype)
        if i in dec.routed and k < N:
            active = ~is_vis_t.clone()
            for f, emb in enumerate(frames):
                where = torch.nonzero(frame_of_t == f).squeeze(-1)  # (N,)
                prev = frames[f - 1] if f > 0 else torch.zeros_like(emb)
                cos = torch.nn.functional.cosine_similarity(emb.float(), prev.float(), dim=-1, eps=1e-6)
                novelty = 1.0 - cos - 1e-6 * torch.arange(N, dtype=torch.float32)
                score = dec.scores(i, x[where], novelty)
                top = torch.topk(score, k).indices
                active[where[top]] = True
                if dec.router == "learned":
                    weights[where[top]] = torch.sigmoid(score[top]).to(x.dtype)
        idx = torch.nonzero(active).squeeze(-1)
        out, _, _ = dec.block(i, x[idx], positions[idx], (empty_kv, empty_kv), empty_mask)
        w = weights[idx].unsqueeze(-1)
        x = x.clone()
        x[idx] = x[idx] + w * (out - x[idx])
    return [dec.lm_head(dec.final_norm(x[e : e + 1]))[0].float().numpy() for e in ends]
