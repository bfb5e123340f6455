"""The PyTorch oracle: a static KV cache, a Stepper over it, and a no-cache recomputation.

Every later parity check (ONNX export, runtime) compares against `reference_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onsight.exporter.decoder import kept_indices
from onsight.exporter.model import StreamingModel
from onsight.runtime.kv_cache import KVLayout
from onsight.runtime.kv_policy import EvictionPolicy, mod_capacity
from onsight.runtime.stepper import CachedStepper
from onsight.runtime.stream_loop import Sampler, StreamLoop
from onsight.runtime.template import build_template_ids


def layout_for(model: StreamingModel, capacity: int, text_reserve: int) -> KVLayout:
    """The KV layout the exporter writes into a bundle for this model and capacity."""
    dec = model.decoder
    N, k = model.cfg.tokens_per_frame, dec.k
    routed = tuple(i for i in dec.routed if k < N)
    return KVLayout(
        num_layers=len(dec.layers),
        kv_heads=dec.num_kv_heads,
        head_dim=dec.head_dim,
        capacity_dense=capacity,
        capacity_mod=mod_capacity(capacity, N, k, text_reserve) if routed else capacity,
        routed=routed,
        tokens_per_frame=N,
        k=min(k, N),
        dtype=str(dec.embed.weight.dtype).removeprefix("torch."),
    )


class TorchStepper(CachedStepper):
    """Runs the reference model's steps over the shared static KV cache (zero-copy views)."""

    def __init__(
        self,
        model: StreamingModel,
        capacity: int = 4096,
        policy: EvictionPolicy | None = None,
        text_reserve: int = 0,
    ):
        self.dec = model.decoder
        super().__init__(
            layout_for(model, capacity, text_reserve),
            self.dec.inv_freq.numpy(),
            tuple(self.dec.routed),
            policy,
        )

    def _past(self):
        c = self.cache
        past = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(c.k, c.v, strict=True)]
        return past, [torch.from_numpy(c.mask(i)) for i in range(len(c.k))]

    @torch.no_grad()
    def run_text(self, ids: np.ndarray, positions: np.ndarray):
        past, masks = self._past()
        logits, nk, nv = self.dec.text_step(
            torch.from_numpy(ids), torch.from_numpy(positions), past, masks
        )
        return logits.float().numpy(), [k.numpy() for k in nk], [v.numpy() for v in nv]

    @torch.no_grad()
    def run_frame(self, ids, embeds, prev, positions):
        past, masks = self._past()
        logits, nk, nv, kept = self.dec.frame_step(
            torch.from_numpy(ids),
            torch.from_numpy(np.ascontiguousarray(embeds)),
            torch.from_numpy(np.ascontiguousarray(prev)),
            torch.from_numpy(positions),
            past,
            masks,
        )
        return (
            logits.float().numpy(),
            [k.numpy() for k in nk],
            [v.numpy() for v in nv],
            [x.numpy() for x in kept],
        )


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
            for f, emb in enumerate(frames if k > 0 else ()):  # k = 0: vision skips layer i
                where = torch.nonzero(frame_of_t == f).squeeze(-1)  # (N,)
                prev = frames[f - 1] if f > 0 else torch.zeros_like(emb)
                cos = torch.nn.functional.cosine_similarity(
                    emb.float(), prev.float(), dim=-1, eps=1e-6
                )
                novelty = 1.0 - cos - 1e-6 * torch.arange(N, dtype=torch.float32)
                score = dec.scores(i, x[where], novelty, positions[where])
                top = kept_indices(score, k, dec.cfg.mod.keep_last)
                active[where[top]] = True
                if str(i) in dec.experts and dec.cfg.mod.gate == "sigmoid":
                    # the trained gate, whichever router selects (straight-through: w = 1)
                    gate = (
                        score[top]
                        if dec.router == "learned"
                        else dec.experts[str(i)](x[where[top]])
                    )
                    weights[where[top]] = torch.sigmoid(gate).to(x.dtype)
        idx = torch.nonzero(active).squeeze(-1)
        out, _, _ = dec.block(i, x[idx], positions[idx], (empty_kv, empty_kv), empty_mask)
        w = weights[idx].unsqueeze(-1)
        x = x.clone()
        x[idx] = x[idx] + w * (out - x[idx])
    return [dec.lm_head(dec.final_norm(x[e : e + 1]))[0].float().numpy() for e in ends]
